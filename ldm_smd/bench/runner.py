"""The known-truth Gaussian-mixture benchmark (``ldm-smd bench-mixture``), SMD.md section 6.

A benchmark config is an ordinary stage-2 config with a ``bench:`` block
(:mod:`ldm_smd.bench.spec`). For every method, every number of steps ``T`` and every seed, the
runner writes that run's stage-2 config to ``out_dir/runs/<method>_T<T>_seed<seed>/config.yaml``
and trains it exactly as ``ldm-smd train`` would (:func:`ldm_smd.train.build_run`: the same
LightningModule, objective, EMA, optimiser, learning-rate schedule, gradient clipping, NaN guard
and checkpoints), then samples the trained model with its sampler (DDPM over all ``T`` steps in
the shipped configs) and scores the samples exactly (:mod:`ldm_smd.eval.mixture_metrics`). Two
reference rows per ``T`` and seed need no training: ``exact_posterior`` (a perfect SMD) and
``best_gaussian`` (a perfect Gaussian denoiser).

Seeds (:mod:`ldm_smd.rng`): run ``(method, T, seed)`` has ``seed`` as its config seed, which
seeds the network's initialisation (the global RNG, so every method of a seed starts from the
same backbone), the training draws and the data batches; its samples come from a generator
seeded ``derive_seed(seed, SAMPLE_STREAM, T)``, shared with the reference rows of that seed and
T, and it is scored against the mixture with projections seeded by ``seed`` (comparisons are
paired).
``workers`` changes results only by float rounding (thread counts change summation order).

Outputs in ``out_dir``: ``results.md`` (mean ± sample std over seeds), ``results.json`` (every
run and the summary), ``runs.jsonl`` (each run as it finishes), ``scatter.png`` (samples of the
first seed), ``metrics_vs_T.png``, ``samples/<method>_T<T>_seed<seed>.npz`` (first seed) and
``runs/`` (each run's config, checkpoint and kept samples: ``ldm-smd sample`` reads them like any
run's).

A folder that already holds a benchmark is refused unless ``resume`` (keep every finished
trained run whose saved config and scoring options are this benchmark's, run the rest) or
``overwrite`` (delete the benchmark's own files, once the first run of this one has finished) is
given: :mod:`ldm_smd.bench.earlier`.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ldm_smd import rng
from ldm_smd.bench import earlier
from ldm_smd.bench.spec import bench_options, run_config, schedule_block
from ldm_smd.callbacks import NonFiniteError
from ldm_smd.config import ConfigError, instantiate, load_config, save_config
from ldm_smd.eval import mixture_metrics as mm
from ldm_smd.eval.mixture_report import LEGEND, aggregate, format_table
from ldm_smd.jsonio import dumps, write_json
from ldm_smd.train import build_run

REFERENCES = ("exact_posterior", "best_gaussian")
#: first key of the sampling generator's seed (see :mod:`ldm_smd.rng`)
SAMPLE_STREAM = 11
KEPT_SAMPLES = 4000  # samples kept per run for the scatter plot and the .npz files


def load_bench_config(
    config_path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False
) -> dict[str, Any]:
    """Load and validate a benchmark config; ``quick`` applies ``bench.quick`` first."""
    config = load_config(config_path, overrides)
    if "bench" not in config:
        raise ConfigError(f"{config_path}: a benchmark config needs a 'bench' block "
                          "(methods, T_list, seeds, ...)")
    data = config.get("data") or {}
    if "mixture" not in (data.get("params") or {}):
        raise ConfigError(f"{config_path}: data.params.mixture: the benchmark scores samples "
                          "against a known mixture (ldm_smd.data.mixture_data."
                          "MixtureDataModule)")
    if quick:
        config = load_config(config_path, [*bench_options(config)["quick"], *overrides])
    return config


class _Trace(L.Callback):
    """The loss of every step, and the time from the end of the first step to the last's."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first: float | None = None
        self.last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
        self.last = time.perf_counter()
        self.first = self.first or self.last

    def ms_per_step(self) -> float:
        n = len(self.losses)
        if n < 2 or self.first is None or self.last is None:
            return float("nan")
        return 1000.0 * (self.last - self.first) / (n - 1)


def _quiet_lightning() -> None:
    """Many short runs: Lightning's banners and the notes that hold for every run once."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")


def _score(x: torch.Tensor, mixture, bench: dict, method: str, T: int, seed: int) -> dict:
    metrics = mm.mixture_metrics(x, mixture, seed=seed,
                                 num_projections=int(bench["num_projections"]))
    return {"method": method, "T": T, "seed": seed, **metrics,
            "samples": x[:KEPT_SAMPLES].to(torch.float32).numpy()}


def train_and_sample(config: dict, method: str, T: int, seed: int, *, out_dir: Path) -> dict:
    """Train run ``(method, T, seed)`` through the stage-2 path, sample and score it."""
    bench = bench_options(config)
    run = run_config(config, method, T, seed)
    run_dir = out_dir / "runs" / earlier.run_name(method, T, seed)
    run["run_dir"] = str(run_dir)
    trace = _Trace()
    model, data, trainer = build_run(run, run_dir, extra_callbacks=(trace,))  # writes nothing
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own earlier run of this job
    save_config(run, run_dir / "config.yaml")
    start = time.perf_counter()
    diverged_at = None
    try:
        trainer.fit(model, datamodule=data)
    except NonFiniteError:
        diverged_at = int(trainer.global_step)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    n, batch = int(bench["num_samples"]), int(bench["sample_batch"])
    g = rng.generator(seed, SAMPLE_STREAM, T)
    x = torch.cat([model.sample_latents(min(batch, n - first), generator=g)
                   for first in range(0, n, batch)]).reshape(n, -1)
    sample_s = time.perf_counter() - start
    record = _score(x, data.mixture, bench, method, T, seed)
    tail = trace.losses[-max(1, len(trace.losses) // 10):]
    record.update(train_s=train_s, sample_s=sample_s, steps=len(trace.losses),
                  ms_per_step=trace.ms_per_step(),
                  final_loss=float(np.mean(tail)) if tail else float("nan"),
                  diverged_at=diverged_at)
    earlier.save_finished(run_dir, record, config)  # what --resume keeps
    return record


def reference_run(config: dict, method: str, T: int, seed: int) -> dict:
    """Score the exact-posterior or best-Gaussian sampler at ``T`` (no training)."""
    bench = bench_options(config)
    mixture = instantiate(config["data"]["params"]["mixture"])
    betas = instantiate(schedule_block(config["model"]["params"], T)).betas
    g = rng.generator(seed, SAMPLE_STREAM, T)
    n = int(bench["num_samples"])
    start = time.perf_counter()
    sampler = mm.exact_posterior_sample if method == "exact_posterior" else (
        mm.best_gaussian_sample)
    x = sampler(mixture, betas, n, generator=g)
    record = _score(x, mixture, bench, method, T, seed)
    record.update(train_s=0.0, sample_s=time.perf_counter() - start, steps=0,
                  ms_per_step=float("nan"), final_loss=float("nan"), diverged_at=None)
    return record


def _job(args: tuple) -> dict:
    config, method, T, seed, out_dir = args
    if method in REFERENCES:
        return reference_run(config, method, T, seed)
    return train_and_sample(config, method, T, seed, out_dir=out_dir)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    _quiet_lightning()


def run_mixture_benchmark(
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
    docstring). Returns ``{"summary", "runs", "table", "files", ...}``.
    """
    from tqdm.auto import tqdm

    from ldm_smd.eval import plots

    config = load_bench_config(config_path, overrides, quick=quick)
    bench = bench_options(config)
    known = list(config["bench"]["methods"])
    methods = list(methods or known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"methods {unknown} are not in bench.methods of {config_path}; "
                          f"it has: {', '.join(known)}")
    T_list = [int(t) for t in (T_list or bench["T_list"])]
    seeds = [int(s) for s in (seeds if seeds is not None else bench["seeds"])]
    refs = list(REFERENCES) if bench["references"] else []
    out = Path(out_dir)
    # seed by seed (a stopped run still has whole seeds in runs.jsonl), costliest job first
    jobs = []
    for s in seeds:
        trained = sorted(((config, m, T, s, out) for m in methods for T in T_list),
                         key=lambda j: (-methods.index(j[1]), -j[2]))
        jobs += trained + [(config, m, T, s, out) for m in refs for T in T_list]
    found = earlier.check_folder(out, resume=resume, overwrite=overwrite)
    kept = earlier.kept_runs(out, [j for j in jobs if j[1] not in REFERENCES]) if resume else {}
    jobs_left = [j for j in jobs if (j[1], j[2], j[3]) not in kept]
    workers = int(workers if workers is not None else bench["workers"])
    threads = int(bench["threads_per_worker"])
    start = time.perf_counter()
    runs: list[dict] = list(kept.values())
    bar = tqdm(total=len(jobs), initial=len(kept), desc="bench-mixture", disable=not progress)
    log = out / "runs.jsonl"  # one line per finished run, written as they come in

    def line(record: dict) -> str:
        return dumps({k: v for k, v in record.items() if k != "samples"}) + "\n"

    def start_log() -> None:
        # after the first run of this benchmark (its checks passed): what it replaces goes
        if overwrite:
            earlier.clear(found, keep={earlier.run_name(m, T, s) for _, m, T, s, _ in jobs})
        out.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(line(r) for r in runs))

    def collect(record: dict) -> None:
        first = len(runs) == len(kept)
        runs.append(record)
        if first:
            start_log()
        else:
            with log.open("a") as handle:
                handle.write(line(record))
        bar.update(1)

    if workers <= 1:
        saved = torch.get_num_threads()
        _init_worker(threads)
        try:
            for job in jobs_left:
                collect(_job(job))
        finally:
            torch.set_num_threads(saved)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            for future in as_completed([pool.submit(_job, job) for job in jobs_left]):
                collect(future.result())
    if not jobs_left:
        start_log()
    bar.close()
    wall = time.perf_counter() - start
    order = {(m, T, s): i for i, (_, m, T, s, _) in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r["method"], r["T"], r["seed"])])
    return _write_outputs(config, config_path, out, runs, methods + refs, T_list, seeds, wall,
                          plots)


def _write_outputs(config, config_path, out: Path, runs, all_methods, T_list, seeds, wall,
                   plots) -> dict[str, Any]:
    bench = bench_options(config)
    summary = aggregate(runs, all_methods, T_list)
    table = format_table(summary, all_methods, T_list)
    mixture = instantiate(config["data"]["params"]["mixture"])
    samples = {(r["method"], r["T"]): r["samples"] for r in runs if r["seed"] == seeds[0]}
    (out / "samples").mkdir(exist_ok=True)
    for (m, T), x in samples.items():
        np.savez_compressed(out / "samples" / f"{m}_T{T}_seed{seeds[0]}.npz", samples=x)
    files = {
        "table": str(out / "results.md"),
        "json": str(out / "results.json"),
        "scatter": plots.sample_scatter(samples, mixture, all_methods, T_list,
                                        out / "scatter.png"),
        "metrics_plot": plots.metrics_vs_steps(summary, all_methods, T_list,
                                               out / "metrics_vs_T.png"),
    }
    steps = (config.get("trainer") or {}).get("max_steps")
    header = (f"# bench-mixture: {config_path}\n\n{len(seeds)} seed(s) {seeds}; {steps} "
              f"training steps; {bench['num_samples']} samples per run; the model's sampler "
              f"over all T steps; mean ± sample std over seeds; SW floor in brackets; wall "
              f"{wall:.0f} s\n\n{LEGEND}\n")
    Path(files["table"]).write_text(header + table)
    record = {
        "config": config, "mixture": mixture.describe(), "methods": all_methods,
        "T_list": T_list, "seeds": seeds, "wall_s": wall, "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
    }
    write_json(files["json"], record)
    return {**record, "table": table, "files": files}
