"""What a benchmark folder already holds: the refusal, ``--resume`` and ``--overwrite``.

A trained run ``runs/<method>_T<T>_seed<seed>/`` is finished when it holds ``scores.json`` (its
record and the scoring options it was scored with: ``bench.num_samples``, ``num_projections``,
``sample_batch``) beside ``samples.npz`` (its kept samples) and ``config.yaml``. ``--resume``
keeps a finished run when its saved config is this benchmark's config of that run and its scoring
options are this benchmark's; anything else is run again. ``--overwrite`` deletes only the
benchmark's own entries: the files in :data:`FILES`, run folders named like a run that hold a
``config.yaml``, and ``samples/<method>_T<T>_seed<seed>.npz``; nothing else in the folder.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ldm_smd.bench.spec import bench_options, run_config
from ldm_smd.config import to_plain
from ldm_smd.errors import OutputError
from ldm_smd.eval.mixture_report import METRIC_KEYS
from ldm_smd.jsonio import write_json

#: the benchmark's own files in its folder
FILES = ("runs.jsonl", "results.md", "results.json", "scatter.png", "metrics_vs_T.png")
SCORING_KEYS = ("num_samples", "num_projections", "sample_batch")
RUN_NAME = re.compile(r".+_T\d+_seed\d+")


def run_name(method: str, T: int, seed: int) -> str:
    return f"{method}_T{T}_seed{seed}"


def scoring(config: dict) -> dict[str, Any]:
    """The options that decide how a run is sampled and scored."""
    bench = bench_options(config)
    return {k: bench[k] for k in SCORING_KEYS}


def save_finished(run_dir: Path, record: dict, config: dict) -> None:
    """Mark a trained run finished: its kept samples, then its record and scoring options."""
    np.savez_compressed(run_dir / "samples.npz", samples=record["samples"])
    write_json(run_dir / "scores.json", {
        "scoring": scoring(config),
        "record": {k: v for k, v in record.items() if k != "samples"}})


def entries(out: Path) -> list[Path]:
    """The benchmark's own entries in ``out`` (see the module docstring)."""
    found = [out / name for name in FILES if (out / name).is_file()]
    runs = out / "runs"
    if runs.is_dir():
        found += sorted(p for p in runs.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)
                        and (p / "config.yaml").is_file())
    samples = out / "samples"
    if samples.is_dir():
        found += sorted(p for p in samples.glob("*.npz") if RUN_NAME.fullmatch(p.stem))
    return found


def check_folder(out: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """The earlier benchmark's entries in ``out``; refuses them unless ``resume`` or
    ``overwrite`` (not both)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    found = entries(out)
    if found and not (resume or overwrite):
        finished = sum((p / "scores.json").is_file() for p in found if p.is_dir())
        raise OutputError(
            f"--out {out} already holds a benchmark ({finished} finished trained runs in "
            f"{out / 'runs'}, {sum(p.is_file() for p in found)} result files): continue it "
            "with --resume (finished runs of the same config are kept), start it over with "
            "--overwrite, or give another --out")
    return found


def kept_runs(out: Path, jobs: Iterable[tuple]) -> dict[tuple, dict]:
    """The finished trained runs of ``jobs`` (``(config, method, T, seed, ...)``) that a resumed
    benchmark keeps, by ``(method, T, seed)``, each with its kept samples."""
    kept = {}
    for config, method, T, seed, *_ in jobs:
        run_dir = out / "runs" / run_name(method, T, seed)
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            scores = json.loads((run_dir / "scores.json").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue  # not finished, or not readable: run again
        expected = {**run_config(config, method, T, seed), "run_dir": str(run_dir)}
        if (saved != yaml.safe_load(yaml.safe_dump(to_plain(expected), sort_keys=False))
                or scores.get("scoring") != scoring(config)):
            continue
        try:  # the samples only of a run that is kept
            samples = np.load(run_dir / "samples.npz")["samples"]
        except (OSError, ValueError, KeyError):
            continue
        record = {k: (float("nan") if v is None and k in METRIC_KEYS else v)
                  for k, v in scores["record"].items()}
        kept[(method, T, seed)] = {**record, "samples": samples}
    return kept


def clear(found: Iterable[Path], *, keep: set[str]) -> None:
    """Delete the earlier benchmark's ``found`` entries but the run folders named in ``keep``
    (this benchmark's own jobs, which replace their folders themselves)."""
    for path in found:
        if path.is_dir():
            if path.name not in keep:
                shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
