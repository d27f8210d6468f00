"""The image benchmark end to end: ``ldm-smd bench --quick`` on both shipped MNIST-5k configs
(the data prepared and the domain classifier trained briefly once per test session). Every row is
there, the real-data row is the held-out split's floor, the kept samples score again to the
numbers in the table, the grids are readable, and the latent benchmark trains its first stage once
and gives it to every run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_smd.cli import main as cli
from ldm_smd.config import load_config
from ldm_smd.eval.image_scores import ImageScorer

ROOT = Path(__file__).resolve().parents[2]
ROWS = {"vanilla", "smd_paper", "smd_energy", "smd_image", "ddim", "dpmpp", "real_data"}


def _overrides(root: Path, classifier: Path) -> list[str]:
    return [f"data.params.train.params.root={root}", f"bench.scorer.params.data={root}",
            f"bench.scorer.params.classifier={classifier}"]


@pytest.mark.parametrize("name", ["mnist5k-pixel", "mnist5k-latent"])
def test_quick_image_benchmark(name, tmp_path, mnist5k_root, short_classifier, capsys):
    out = tmp_path / name
    config = ROOT / "configs" / "bench" / f"{name}.yaml"
    args = ["bench", "--config", str(config), "--quick", "--out", str(out),
            *_overrides(mnist5k_root, short_classifier)]
    assert cli(args) == 0
    data = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == ROWS and data["T_list"] == [2] and data["seeds"] == [0]
    assert data["layout"]["metrics"][0] == "fd"
    head = (out / "results.md").read_text().split("| T | method |")[1].splitlines()[0]
    assert head.startswith(" fd ↓ | fd removed | confident ↑ |") and "| ms/step | steps |" in head
    scorer = ImageScorer(data=mnist5k_root, classifier=short_classifier)
    floor = scorer.floor()
    assert runs["real_data"]["fd"] == pytest.approx(floor["fd"])
    assert runs["ddim"]["base_T"] == 1000 and runs["ddim"]["sampler"]["spacing"] == "trailing"
    for row in ROWS - {"real_data"}:
        images = np.load(out / "samples" / f"{row}_T2_seed0.npz")["images"]
        assert images.dtype == np.uint8 and images.shape == (100, 32, 32, 1)  # bench.quick
        again = scorer.score(images)
        assert again == pytest.approx({k: runs[row][k] for k in scorer.metrics}, rel=1e-5)
        grid = Image.open(out / "grids" / f"{row}_T2.png")
        assert grid.width >= 400 and grid.mode == "L"
    assert Path(data["config"]["run_dir"]).name == "base"  # the config, not a run's
    if name.endswith("latent"):
        first = out / "first_stage" / "checkpoints" / "last.ckpt"
        scale = json.loads((out / "first_stage" / "scale.json").read_text())["scale_factor"]
        run = load_config(out / "runs" / "smd_energy_T2_seed0" / "config.yaml")
        assert run["model"]["params"]["first_stage"] == str(first)
        assert run["model"]["params"]["scale_factor"] == scale
        stamp = first.stat().st_mtime_ns
        capsys.readouterr()
        assert cli([*args, "--resume"]) == 0  # everything kept, the first stage too
        said = capsys.readouterr().out
        assert "first stage kept" in said and "5 finished job(s) kept, 1 run now" in said
        assert first.stat().st_mtime_ns == stamp
