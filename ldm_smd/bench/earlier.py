"""What a benchmark folder already holds: the refusal, ``--resume`` and ``--overwrite``.

A benchmark writes ``bench.json`` (the config file it was run from, its layout) when it starts.
A trained run ``runs/<name>/`` is finished when it holds ``scores.json`` (its records and the
scoring options it was scored with: ``bench.num_samples``, ``sample_batch``, the scorer block,
``score_steps``, and a base model's fast samplers) beside ``samples_<row>_T<T>.npz`` (its kept
samples, one file per row it scored) and ``config.yaml``. ``--resume`` refuses a folder that
another config file made (it names both: ``--overwrite`` replaces that benchmark), and keeps a
finished run when its saved config is this benchmark's config of that run, its scoring options are
this benchmark's and it holds every row asked of it; anything else is run again, and the runner
says which runs it replaces. A ``--resume`` that asks a finished base model of the fast samplers for
step counts it lacks does not train it again: it keeps its rows and samples the new ones from its
final checkpoint (:func:`reusable_base`).
``--overwrite`` deletes only the benchmark's own entries: the files in :data:`FILES`, run folders
named like a run that hold a ``config.yaml``, the first stage's folder,
``samples/<row>_T<T>_seed<seed>.npz`` and ``grids/<row>_T<T>.png``; nothing else in the folder.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ldm_smd.bench.spec import bench_options, fast_samplers, run_config, scorer_spec
from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.config import to_plain
from ldm_smd.errors import OutputError
from ldm_smd.eval.bench_report import DESCRIPTION_FILE, Layout, summary_keys
from ldm_smd.jsonio import write_json
from ldm_smd.run_folder import LAST

#: the benchmark's own files in its folder
FILES = ("runs.jsonl", "results.md", "results.json", "scatter.png", "metrics_vs_T.png",
         DESCRIPTION_FILE)
RUN_NAME = re.compile(r".+_T\d+_seed\d+")
PICTURE_NAME = re.compile(r".+_T\d+")
FIRST_STAGE = "first_stage"
#: what a run's training cost (:func:`ldm_smd.bench.runs.train_run`), in each of its records
COST_KEYS = ("train_s", "steps", "ms_per_step", "final_loss", "diverged_at")


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
                  scoring_options: dict, *, earlier: Sequence[dict] = ()) -> None:
    """Mark a trained run finished: each row's kept samples, then its records and scoring;
    ``earlier``: the records it already held (a reused base model's), kept beside the new ones
    unless a new record has their row."""
    for record, arrays in zip(records, kept, strict=True):
        np.savez_compressed(kept_file(run_dir, record["method"], record["T"]), **arrays)
    new = {(r["method"], r["T"]) for r in records}
    held = [r for r in earlier if (r["method"], r["T"]) not in new]
    write_json(run_dir / "scores.json", {"scoring": scoring_options,
                                         "records": [*held, *records]})


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
                  seed: int) -> tuple[list[dict] | None, str]:
    """``(records with their kept samples, "")`` of the finished run in ``run_dir`` when this
    benchmark keeps it (it holds every row of ``rows``), else ``(None, why not)``."""
    scores, why = _read_scores(run_dir, config=config, scoring_options=scoring_options,
                               method=method, T=T, seed=seed)
    if scores is None:
        return None, why
    by_row = {(r["method"], r["T"]): r for r in scores.get("records") or []}
    if any(row not in by_row for row in rows):
        return None, "it lacks rows asked for now"
    numeric = set(summary_keys(layout, list(by_row.values())))
    records = []
    for row, t in rows:
        kept = read_kept(run_dir, row, t)
        if kept is None:
            return None, "its kept samples are missing"
        records.append({**as_record(by_row[(row, t)], numeric), "kept": kept})
    return records, ""


def _read_scores(run_dir: Path, *, config: dict, scoring_options: dict, method: str, T: int,
                 seed: int) -> tuple[dict | None, str]:
    """``(scores.json, "")`` of the finished run in ``run_dir`` when its saved config and scoring
    options are this benchmark's, else ``(None, why not)``."""
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
    return scores, ""


def read_kept(run_dir: Path, row: str, T: int) -> dict[str, np.ndarray] | None:
    """The samples a run kept of ``row`` at ``T`` (``None``: missing or unreadable)."""
    try:
        with np.load(kept_file(run_dir, row, T)) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None


def as_record(saved: Mapping[str, Any], numeric: set[str]) -> dict[str, Any]:
    """A record as ``scores.json`` saved it, its ``numeric`` keys' ``null`` read as NaN."""
    return {k: (float("nan") if v is None and k in numeric else v) for k, v in saved.items()}


@dataclass(frozen=True)
class BaseModel:
    """A finished base model of the fast samplers, which a later command samples at the step
    counts it lacks instead of training it again (:func:`reusable_base`).

    Args:
        checkpoint: its final checkpoint, written at the config's last training step.
        records: every record of its ``scores.json`` (step counts not asked for now too); their
            :data:`COST_KEYS` are the base model's training cost.
    """

    checkpoint: Path
    records: tuple[dict[str, Any], ...]

    @property
    def cost(self) -> dict[str, Any]:
        return {key: self.records[0][key] for key in COST_KEYS}


def reusable_base(run_dir: Path, *, config: dict, method: str, T: int,
                  seed: int) -> BaseModel | None:
    """The base model in ``run_dir`` when it can serve this benchmark: its saved config and
    scoring options are this benchmark's, its training did not diverge, and its ``last.ckpt`` was
    written at the config's ``trainer.max_steps`` (so it is the model its records were scored
    with); else ``None``."""
    scores, _ = _read_scores(run_dir, config=config, scoring_options=scoring(config, fast=True),
                             method=method, T=T, seed=seed)
    records = tuple((scores or {}).get("records") or ())
    if not records or any(r.get("diverged_at") is not None for r in records):
        return None
    checkpoint = run_dir / "checkpoints" / LAST
    try:
        step = load_checkpoint(checkpoint, mmap=True).get("global_step")
    except (CheckpointError, AttributeError):
        return None
    last_step = (run_config(config, method, T, seed).get("trainer") or {}).get("max_steps")
    if not isinstance(last_step, int) or step != last_step:
        return None
    return BaseModel(checkpoint, records)


def kept_jobs(out: Path, jobs: Sequence[Any], config: dict, *, layout: Layout,
              resume: bool) -> tuple[dict[Any, list[dict]], set[Any], list[str]]:
    """``(kept, reused, replaced)``: the records of each trained job (a
    :class:`ldm_smd.bench.runs.Job`) whose finished run a ``resume`` keeps; the ``fast`` jobs
    whose base model a ``resume`` samples at the step counts it lacks (:func:`reusable_base`);
    and the run folders in ``out`` that are there but not kept (``name (why)`` where a resume
    says why), which their jobs replace or, for a reused base model, complete."""
    kept: dict[Any, list[dict]] = {}
    reused = set()
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
        elif resume and job.kind == "fast" and reusable_base(
                run_dir, config=config, method=job.method, T=job.T, seed=job.seed):
            reused.add(job)
            replaced.append(f"{job.name} ({why}: its base model is kept and samples them)")
        elif run_dir.exists():
            replaced.append(f"{job.name} ({why})" if why else job.name)
    return kept, reused, replaced


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
