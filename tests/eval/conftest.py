"""A domain classifier trained briefly, once per test session, through the command line."""

import pytest

from ldm_smd.cli import main as cli

#: the short schedule of the tests (the shipped default trains 15 epochs)
SHORT_EPOCHS = 2


@pytest.fixture(scope="session")
def short_classifier(mnist5k_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "classifier.safetensors"
    assert cli(["train-classifier", "--data", str(mnist5k_root), "--out", str(path),
                "--epochs", str(SHORT_EPOCHS)]) == 0
    return path
