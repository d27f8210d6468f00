"""``make demo``'s script at a smoke budget, as a user runs it (a subprocess from the repository
root): it writes the one picture (inputs above reconstructions, vanilla and SMD at T = 2 and 5)
and prints each model's classifier figures; a second run into the same folder redoes the demo."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_demo_smoke(tmp_path, mnist5k_root, short_classifier):
    data = tmp_path / "mnist5k"
    data.mkdir()
    for name in ("train.npz", "heldout.npz", "split.json"):
        shutil.copy(mnist5k_root / name, data / name)
    shutil.copy(short_classifier, data / "classifier.safetensors")  # the demo would train one
    out = tmp_path / "demo"
    args = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(out), "--data",
            str(data), "--ae-steps", "4", "--ldm-steps", "4", "--samples", "100"]
    for _ in range(2):  # the second run replaces the first one's outputs
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    rows = [line.split() for line in lines if re.match(r"\s+(vanilla|SMD)\s+[25]\s", line)]
    assert sorted((r[0], r[1]) for r in rows) == [("SMD", "2"), ("SMD", "5"),
                                                  ("vanilla", "2"), ("vanilla", "5")]
    assert all(float(r[2]) > 0 and 0 <= float(r[3]) <= 1 for r in rows)
    picture = Image.open(out / "demo.png")
    assert picture.width >= 750 and picture.height >= picture.width  # four grids below a strip
    assert f"the picture: {out / 'demo.png'}" in done.stdout
    for method in ("vanilla", "smd_image"):
        for T in (2, 5):
            assert (out / "bench" / "samples" / f"{method}_T{T}_seed0.npz").exists()
