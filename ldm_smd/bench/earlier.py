"""What a benchmark folder already holds: the refusal, ``--resume`` and ``--overwrite``.

A benchmark writes ``bench.json`` (the config file it was run from, its layout) when it starts.
A trained run ``runs/<name>/`` is finished when it holds ``scores.json`` (its records and the
scoring options it was scored with: ``bench.num_samples``, ``sample_batch``, the scorer block,
``score_steps``, and a base model's fast samplers) beside ``samples_<row>_T<T>.npz`` (its kept
samples, one file per row it scored) and ``config.yaml``. ``--resume`` refuses a folder that
another config file made (it names both: ``--overwrite`` replaces that benchmark), and keeps a
finished run when its saved config is this benchmark's config of that run, its scoring options are
this benchmark's and it holds every row asked of it; anything else is run again, and the runner
says which runs it replaces. A finished base model of the fast samplers asked for more step counts
is not trained again: it keeps its rows and samples the new ones from its final checkpoint.
``--overwrite`` deletes only the benchmark's own entries: the files in :data:`FILES`, run folders
named like a run that hold a ``config.yaml``, the first stage's folder,
``samples/<row>_T<T>_seed<seed>.npz`` and ``grids/<row>_T<T>.png``; nothing else in the folder.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ldm_smd.bench.spec import bench_options, fast_samplers, run_config, scorer_spec
from ldm_smd.config import to_plain
from ldm_smd.errors import OutputError
from ldm_smd.eval.bench_report import DESCRIPTION_FILE, Layout, summary_keys
from ldm_smd.jsonio import write_json

#: the benchmark's own files in its folder
FILES = ("runs.jsonl", "results.md", "results.json", "scatter.png", "metrics_vs_T.png",
         DESCRIPTION_FILE)
RUN_NAME = re.compile(r".+_T\d+_seed\d+")
PICTURE_NAME = re.compile(r".+_T\d+")
FIRST_STAGE = "first_stage"
LACKS_ROWS = "it lacks rows asked for now"


def run_name(method: str, T: int, seed: int) -> str:
    return f"{method}_T{T}_seed{seed}"


def scoring(config: Mapping[str, Any], *, fast: bool = False) -> dict[str, Any]:
    """The options that decide how a run is sampled and scored (a base model's: its fast
    samplers too)."""
    bench = bench_options(config)
    out = {"num_samples": bench["num_samples"], "sample_batch": bench["sample_batch"],
           "scorer": scorer_spec(config), "score_steps": sorted(bench["score_steps"])}
    if fast:
        out["fast_samplers"] = fast_samplers(config)
    return out


def kept_file(run_dir: Path, row: str, T: int) -> Path:
    return run_dir / f"samples_{row}_T{T}.npz"


def save_finished(run_dir: Path, records: Sequence[dict], kept: Sequence[dict],
                  scoring_options: dict) -> None:
    """Mark a trained run finished: each row's kept samples, then its records and scoring."""
    for record, arrays in zip(records, kept, strict=True):
        np.savez_compressed(kept_file(run_dir, record["method"], record["T"]), **arrays)
    write_json(run_dir / "scores.json", {"scoring": scoring_options, "records": list(records)})


def entries(out: Path) -> list[Path]:
    """The benchmark's own entries in ``out`` (see the module docstring)."""
    found = [out / name for name in FILES if (out / name).is_file()]
    runs = out / "runs"
    if runs.is_dir():
        found += sorted(p for p in runs.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)
                        and (p / "config.yaml").is_file())
    if (out / FIRST_STAGE / "config.yaml").is_file():
        found.append(out / FIRST_STAGE)
    for folder, pattern, suffix in (("samples", RUN_NAME, ".npz"), ("grids", PICTURE_NAME, ".png")):
        if (out / folder).is_dir():
            found += sorted(p for p in (out / folder).glob(f"*{suffix}")
                            if pattern.fullmatch(p.stem))
    return found


def describe(found: Sequence[Path]) -> str:
    """``N trained runs (M finished), K files`` of an earlier benchmark's entries."""
    runs = [p for p in found if p.is_dir() and p.name != FIRST_STAGE]
    finished = sum((p / "scores.json").is_file() for p in runs)
    first = " and its first stage" if any(p.name == FIRST_STAGE for p in found) else ""
    return (f"{len(runs)} trained runs ({finished} finished){first}, "
            f"{sum(p.is_file() for p in found)} result files")


def made_by(out: Path) -> str | None:
    """The config file the benchmark in ``out`` was started from (``None``: not recorded)."""
    try:
        return json.loads((out / DESCRIPTION_FILE).read_text()).get("config_file")
    except (OSError, ValueError):
        return None


def check_folder(out: Path, *, config_file: str, resume: bool, overwrite: bool) -> list[Path]:
    """The earlier benchmark's entries in ``out``; refuses them unless ``resume`` (of the same
    config file) or ``overwrite`` (not both)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    found = entries(out)
    if found and not (resume or overwrite):
        raise OutputError(
            f"--out {out} already holds a benchmark ({describe(found)}; in {out / 'runs'}): "
            "continue it with --resume (finished runs of the same config are kept), start it "
            "over with --overwrite, or give another --out")
    earlier = made_by(out)
    if found and resume and earlier is not None and earlier != config_file:
        raise OutputError(
            f"--resume: --out {out} holds the benchmark of {earlier} ({describe(found)}), not "
            f"of {config_file}, and nothing in it was changed: give another --out, or replace "
            "that benchmark with --overwrite")
    return found


def describe_start(out: Path, *, config_file: str, layout: Layout, rows: Sequence[str],
                   T_list: Sequence[int], seeds: Sequence[int]) -> None:
    """Write ``bench.json``: what made this folder, and the layout a table of its
    ``runs.jsonl`` needs."""
    write_json(out / DESCRIPTION_FILE, {"config_file": config_file, "layout": layout.to_json(),
                                       "methods": list(rows), "T_list": list(T_list),
                                       "seeds": list(seeds)})


def expected_config(config: Mapping[str, Any], method: str, T: int, seed: int,
                    run_dir: Path) -> dict[str, Any]:
    """The config a run folder of ``(method, T, seed)`` saves, as YAML reads it back."""
    run = {**run_config(config, method, T, seed), "run_dir": str(run_dir)}
    return yaml.safe_load(yaml.safe_dump(to_plain(run), sort_keys=False))


def read_finished(run_dir: Path, *, config: dict, scoring_options: dict,
                  rows: Sequence[tuple[str, int]], layout: Layout, method: str, T: int,
                  seed: int, partial: bool = False) -> tuple[list[dict] | None, str]:
    """``(records with their kept samples, "")`` of the finished run in ``run_dir`` when this
    benchmark keeps it (it holds every row of ``rows``; ``partial``: the rows of ``rows`` it
    holds, when it holds any), else ``(None, why not)``."""
    if not (run_dir / "config.yaml").is_file():
        return None, ""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        scores = json.loads((run_dir / "scores.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None, "unfinished"
    if saved != expected_config(config, method, T, seed, run_dir):
        return None, "its config differs"
    if scores.get("scoring") != scoring_options:
        return None, "its scoring options differ"
    by_row = {(r["method"], r["T"]): r for r in scores.get("records") or []}
    held = [row for row in rows if row in by_row]
    if not held or (len(held) < len(rows) and not partial):
        return None, LACKS_ROWS
    numeric = set(summary_keys(layout, list(by_row.values())))
    records = []
    for row, t in held:
        try:  # the samples only of a run that is kept
            with np.load(kept_file(run_dir, row, t)) as data:
                kept = {k: data[k] for k in data.files}
        except (OSError, ValueError):
            return None, "its kept samples are missing"
        record = {k: (float("nan") if v is None and k in numeric else v)
                  for k, v in by_row[(row, t)].items()}
        records.append({**record, "kept": kept})
    return records, ""


def base_checkpoint(run_dir: Path) -> Path | None:
    """The final checkpoint of a finished base model's run (a ``fast`` job), when it holds one:
    a later command that asks it for more step counts samples it instead of training it again."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() and (run_dir / "scores.json").is_file() else None


def kept_jobs(out: Path, jobs: Sequence[Any], config: dict, *, layout: Layout,
              resume: bool) -> tuple[dict[Any, list[dict]], list[str]]:
    """``(kept, replaced)``: the records of each trained job (a :class:`ldm_smd.bench.runs.Job`)
    whose finished run a ``resume`` keeps, and the run folders in ``out`` that are there but not
    kept (``name (why)`` where a resume says why), which their jobs replace."""
    kept: dict[Any, list[dict]] = {}
    replaced = []
    for job in jobs:
        if job.kind == "reference":
            continue
        run_dir = out / "runs" / job.name
        records, why = read_finished(
            run_dir, config=config, scoring_options=scoring(config, fast=job.kind == "fast"),
            rows=job.rows(config), layout=layout, method=job.method, T=job.T,
            seed=job.seed) if resume else (None, "")
        if records is not None:
            kept[job] = records
        elif why == LACKS_ROWS and job.kind == "fast" and base_checkpoint(run_dir):
            replaced.append(f"{job.name} ({why}: its base model is kept and samples them)")
        elif run_dir.exists():
            replaced.append(f"{job.name} ({why})" if why else job.name)
    return kept, replaced


def clear(out: Path, found: Iterable[Path], *, keep: set[str]) -> list[str]:
    """Delete the earlier benchmark's ``found`` entries in ``out`` but the folders named in
    ``keep`` (this benchmark's own runs and first stage, which replace their folders themselves);
    returns what was deleted, relative to ``out``."""
    deleted = []
    for path in found:
        folder = path.is_dir()
        if folder and path.name in keep:
            continue
        if folder:
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        deleted.append(path.relative_to(out).as_posix() + ("/" if folder else ""))
    return deleted
