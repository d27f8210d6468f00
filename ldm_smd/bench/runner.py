"""The benchmark runner (``ldm-smd bench``; ``ldm-smd bench-mixture`` is the same command).

A benchmark config is an ordinary stage-2 config with a ``bench:`` block
(:mod:`ldm_smd.bench.spec`); its scorer (:mod:`ldm_smd.bench.scorers`) is its kind of data: a
Gaussian mixture with known density (exact metrics), or images judged by a domain classifier.
For every method, every number of steps ``T`` and every seed, the runner writes that run's
stage-2 config to ``out_dir/runs/<method>_T<T>_seed<seed>/config.yaml`` and trains it exactly as
``ldm-smd train`` would (:func:`ldm_smd.train.build_run`: the same LightningModule, objective,
EMA, optimiser, learning-rate schedule, gradient clipping, NaN guard and checkpoints), samples
the trained model with its sampler (over all ``T`` steps in the shipped configs; images decoded
through its first stage) and scores the samples (:mod:`ldm_smd.bench.runs`). The scorer's
reference rows need no training (the exact posterior and the best Gaussian denoiser of a mixture;
the held-out images, ``real_data``). With ``bench.fast_samplers`` one model per seed is trained at
a large ``T`` and sampled with each fast sampler at ``steps = T`` for every ``T``: what a user
would otherwise pick. With ``bench.first_stage`` an autoencoder is trained once
(:mod:`ldm_smd.bench.first_stage`) and every run diffuses in its latent space.

Seeds (:mod:`ldm_smd.rng`): run ``(method, T, seed)`` has ``seed`` as its config seed, which
seeds the network's initialisation (the global RNG, so every method of a seed starts from the
same backbone), the training draws and the data batches; its samples come from a generator
seeded ``derive_seed(seed, SAMPLE_STREAM, T)``, shared with every other row of that seed and T,
and it is scored with ``seed`` (comparisons are paired). ``workers`` changes results only by
float rounding (thread counts change summation order).

Outputs in ``out_dir`` (:mod:`ldm_smd.bench.outputs`): ``results.md``, ``results.json``,
``runs.jsonl`` (each run as it finishes), ``bench.json`` (what made the folder),
``metrics_vs_T.png``, the scorer's pictures, ``samples/`` (first seed) and ``runs/`` (each run's
config, checkpoint and kept samples: ``ldm-smd sample`` reads them like any run's).

A folder that already holds a benchmark is refused unless ``resume`` (of the same config file:
keep every finished trained run whose saved config and scoring options are this benchmark's, run
the rest) or ``overwrite`` (delete the benchmark's own files, once the first run of this one has
finished) is given: :mod:`ldm_smd.bench.earlier`. Whatever is replaced is said.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from ldm_smd.bench import earlier
from ldm_smd.bench.first_stage import prepare_first_stage
from ldm_smd.bench.outputs import write_outputs
from ldm_smd.bench.runs import SAMPLE_STREAM, Job, run_job
from ldm_smd.bench.scorers import build_scorer
from ldm_smd.bench.spec import bench_options, checked_seeds, fast_samplers, scorer_spec
from ldm_smd.config import ConfigError, load_config
from ldm_smd.console import quiet_lightning
from ldm_smd.jsonio import dumps
from ldm_smd.locks import FolderLock

#: exit status of a worker whose benchmark process has ended
PARENT_GONE = 75

__all__ = ["SAMPLE_STREAM", "load_bench_config", "run_benchmark", "run_mixture_benchmark"]


def worker_pool(workers: int, threads: int) -> ProcessPoolExecutor:
    """``workers`` spawned processes of ``threads`` threads each that end when this one does."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, os.getpid()))


def load_bench_config(
    config_path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False
) -> dict[str, Any]:
    """Load and validate a benchmark config; ``quick`` applies ``bench.quick`` first."""
    config = load_config(config_path, overrides)
    if "bench" not in config:
        raise ConfigError(f"{config_path}: a benchmark config needs a 'bench' block "
                          "(methods, T_list, seeds, ...)")
    if quick:
        config = load_config(config_path, [*bench_options(config)["quick"], *overrides])
    scorer_spec(config)  # a scorer, or data it has a default for
    return config


def _exit_with(parent: int) -> None:
    """End this process as soon as ``parent`` is no longer its parent (it has ended)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(PARENT_GONE)


def _init_worker(threads: int, parent: int | None = None) -> None:
    """Many short runs: Lightning's banners and the notes that hold for every run once.

    In a worker process, ``parent`` is the benchmark's pid: a thread ends the worker when that
    process ends, however it ends. The benchmark's folder lock dies with the benchmark, so a
    worker left training would otherwise write into run folders that a second command (``--resume``)
    has taken over.
    """
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                         name="ldm-smd-exit-with-parent").start()
    torch.set_num_threads(threads)
    quiet_lightning()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no")


def plan(config: dict, methods: list[str], T_list: list[int], seeds: list[int],
         references: list[str]) -> list[Job]:
    """Every job, seed by seed (a stopped benchmark still has whole seeds in ``runs.jsonl``),
    the costliest trained job first."""
    fast = fast_samplers(config)
    jobs: list[Job] = []
    for s in seeds:
        trained = [Job("train", m, T, s) for m in methods for T in T_list]
        jobs += sorted(trained, key=lambda j: (-methods.index(j.method), -j.T))
        if fast:
            jobs.append(Job("fast", fast["method"], int(fast["base_T"]), s, tuple(T_list)))
        jobs += [Job("reference", m, T, s) for m in references for T in T_list]
    return jobs


def run_benchmark(
    config_path: str | Path,
    *,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    methods: list[str] | None = None,
    T_list: list[int] | None = None,
    seeds: list[int] | None = None,
    quick: bool = False,
    workers: int | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the benchmark of ``config_path``; write tables, JSON and plots to ``out_dir``.

    ``overrides`` are ``key.path=value`` items as for ``ldm-smd train``; ``methods``,
    ``T_list``, ``seeds`` and ``workers`` override the ``bench`` block's; ``quick`` applies its
    ``quick`` overrides (a smoke run). ``workers`` training processes run at once with
    ``bench.threads_per_worker`` threads each (``workers = 1``: in this process); ``resume``
    and ``overwrite`` decide what happens to a benchmark already in ``out_dir`` (module
    docstring). Every argument is checked before any work, and the folder is held by this
    command (:class:`~ldm_smd.locks.FolderLock`) while it works. Returns ``{"summary", "runs",
    "table", "files", ...}``.
    """
    config = load_bench_config(config_path, overrides, quick=quick)
    bench = bench_options(config)
    known = list(config["bench"]["methods"])
    methods = list(methods or known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"methods {unknown} are not in bench.methods of {config_path}; "
                          f"it has: {', '.join(known)}")
    T_list = [int(t) for t in (T_list or bench["T_list"])]
    if any(t < 2 for t in T_list):
        raise ConfigError(f"--T {T_list}: every T must be at least 2")
    fast = fast_samplers(config)
    if fast and max(T_list) > int(fast["base_T"]):
        raise ConfigError(f"--T {T_list}: more steps than bench.fast_samplers.base_T = "
                          f"{fast['base_T']}, the T of the model the fast samplers sample")
    seeds = checked_seeds(seeds if seeds is not None else bench["seeds"],
                          key="--seeds" if seeds is not None else "bench.seeds")
    out = Path(out_dir)
    with FolderLock(out, what="--out"):  # one command at a time in a benchmark folder
        return _run(config, config_path, out, methods=methods, T_list=T_list, seeds=seeds,
                    workers=int(workers if workers is not None else bench["workers"]),
                    progress=progress, resume=resume, overwrite=overwrite)


def _run(config: dict, config_path: str | Path, out: Path, *, methods: list[str],
         T_list: list[int], seeds: list[int], workers: int, progress: bool, resume: bool,
         overwrite: bool) -> dict[str, Any]:
    """:func:`run_benchmark` once its arguments are checked, holding the folder's lock."""
    from tqdm.auto import tqdm

    bench = bench_options(config)
    known = list(config["bench"]["methods"])
    fast = fast_samplers(config)
    config_file = str(Path(config_path).resolve())
    found = earlier.check_folder(out, config_file=config_file, resume=resume,
                                 overwrite=overwrite)
    made_by = earlier.made_by(out)
    scorer = build_scorer(scorer_spec(config))  # a missing dataset or classifier: now
    refs = list(scorer.references) if bench["references"] else []
    clash = sorted(set(refs) & set(known) | set(refs) & set((fast or {}).get("samplers", {})))
    if clash:
        raise ConfigError(f"bench: rows {clash} are named like the scorer's reference rows")
    rows = methods + list((fast or {}).get("samplers", {})) + refs
    config = prepare_first_stage(config, out, reuse=resume)
    jobs = plan(config, methods, T_list, seeds, refs)
    kept, reused, replaced = earlier.kept_jobs(out, jobs, config, layout=scorer.layout,
                                               resume=resume)
    if replaced:
        why = "" if resume else f" ({'--overwrite' if overwrite else 'unfinished'})"
        print(f"[ldm-smd] bench: {len(replaced)} run folder(s) in {out / 'runs'} are replaced "
              f"as their jobs run again{why}: {', '.join(replaced)}")
    jobs_left = [replace(j, reuse_base=True) if j in reused else j for j in jobs if j not in kept]
    threads = int(bench["threads_per_worker"])
    start = time.perf_counter()
    runs: list[dict] = [r for records in kept.values() for r in records]
    n_kept = len(runs)
    bar = tqdm(total=len(jobs), initial=len(kept), desc="bench", disable=not progress)
    log = out / "runs.jsonl"  # one line per finished run, written as they come in

    def line(record: dict) -> str:
        return dumps({k: v for k, v in record.items() if k != "kept"}) + "\n"

    def start_log() -> None:
        # after the first job of this benchmark (its checks passed): what it replaces goes
        if overwrite and found:
            deleted = earlier.clear(out, found, keep={j.name for j in jobs} | {
                earlier.FIRST_STAGE})
            print(f"[ldm-smd] bench --overwrite: replaced the earlier benchmark in {out}"
                  f" (of {made_by or 'an unrecorded config'}): deleted "
                  f"{', '.join(deleted) or 'nothing but its run folders, redone'}")
        out.mkdir(parents=True, exist_ok=True)
        earlier.describe_start(out, config_file=config_file, layout=scorer.layout, rows=rows,
                               T_list=T_list, seeds=seeds)
        log.write_text("".join(line(r) for r in runs))

    def collect(records: list[dict]) -> None:
        first = len(runs) == n_kept
        runs.extend(records)
        if first:
            start_log()
        else:
            with log.open("a") as handle:
                handle.writelines(line(r) for r in records)
        bar.update(1)

    if workers <= 1:
        saved = torch.get_num_threads()
        _init_worker(threads)
        try:
            for job in jobs_left:
                collect(run_job((config, job, out)))
        finally:
            torch.set_num_threads(saved)
    else:
        with worker_pool(workers, threads) as pool:
            futures = [pool.submit(run_job, (config, job, out)) for job in jobs_left]
            for future in as_completed(futures):
                collect(future.result())
    if not jobs_left:
        start_log()
    bar.close()
    if resume and found:
        print(f"[ldm-smd] bench --resume: {len(kept)} finished job(s) kept, "
              f"{len(jobs_left)} run now; results.md, results.json, runs.jsonl and the "
              f"pictures in {out} rewritten")
    wall = time.perf_counter() - start
    order = {(job.seed, row, t): i for i, job in enumerate(jobs) for row, t in job.rows(config)}
    runs.sort(key=lambda r: order[(r["seed"], r["method"], r["T"])])
    return write_outputs(config, config_path, out, runs, rows, T_list, seeds, wall, scorer)


#: the command's earlier name (``ldm-smd bench-mixture``), kept for scripts that call it
run_mixture_benchmark = run_benchmark
