"""One job of a benchmark: train a run through stage 2 and score it, train one base model and
score its fast samplers, or score a reference row (no training).

A job runs in the benchmark's process or in a worker process; it returns its records (one per row
and T it scores, each with the samples it keeps under ``kept``) and, for a trained run, marks its
run folder finished (:func:`ldm_smd.bench.earlier.save_finished`).

Seeds (:mod:`ldm_smd.rng`): every row of a seed and T draws its samples from a generator seeded
``derive_seed(seed, SAMPLE_STREAM, T)`` (paired comparisons), and is scored with ``seed``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ldm_smd import rng
from ldm_smd.bench import earlier
from ldm_smd.bench.scorers import Scorer, build_scorer
from ldm_smd.bench.spec import bench_options, fast_samplers, run_config, schedule_block, scorer_spec
from ldm_smd.blocks import instantiate
from ldm_smd.callbacks import NonFiniteError
from ldm_smd.config import save_config
from ldm_smd.eval.bench_report import summary_keys
from ldm_smd.sample import load_diffusion_checkpoint
from ldm_smd.train import build_run

#: first key of the sampling generator's seed (see :mod:`ldm_smd.rng`)
SAMPLE_STREAM = 11


@dataclass(frozen=True)
class Job:
    """One unit of a benchmark's work.

    Args:
        kind: ``train`` (run ``(method, T, seed)``), ``fast`` (the base model ``method`` at
            ``T = base_T`` of a seed, sampled by every fast sampler at each of ``T_list``) or
            ``reference`` (row ``method`` of the scorer at ``T``, no training).
        method: the method, base method or reference row.
        T: the run's number of diffusion steps.
        seed: the run's seed.
        T_list: the steps the fast samplers take (``fast`` jobs only).
        reuse_base: sample the finished base model in the run folder at the steps it lacks
            instead of training it again (``fast`` jobs of a ``--resume`` only; see
            :func:`ldm_smd.bench.earlier.reusable_base`).
    """

    kind: str
    method: str
    T: int
    seed: int
    T_list: tuple[int, ...] = ()
    reuse_base: bool = False

    @property
    def name(self) -> str:
        """The run folder's name (``fast_`` before a base model's)."""
        prefix = "fast_" if self.kind == "fast" else ""
        return prefix + earlier.run_name(self.method, self.T, self.seed)

    def rows(self, config: dict) -> list[tuple[str, int]]:
        """The ``(row, T)`` pairs the job scores."""
        if self.kind != "fast":
            return [(self.method, self.T)]
        return [(name, T) for name in fast_samplers(config)["samplers"] for T in self.T_list]


class RunTrace(L.Callback):
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

    def ms_per_step(self, *, paused: float = 0.0) -> float:
        """Milliseconds a training step took, the ``paused`` seconds (scoring) left out."""
        n = len(self.losses)
        if n < 2 or self.first is None or self.last is None:
            return float("nan")
        return 1000.0 * (self.last - self.first - paused) / (n - 1)

    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return float(np.mean(tail)) if tail else float("nan")


def draw(model: Any, scorer: Scorer, *, n: int, batch: int, generator: torch.Generator,
         **options: Any) -> torch.Tensor:
    """``n`` samples of a stage-2 model in batches of ``batch`` from ``generator``: decoded images
    when the scorer scores images, else the diffusion variable as ``(n, D)``; ``options`` are
    the sampler's (``sampler``, ``steps``, ``spacing``, ``ddim_eta``)."""
    sample = model.sample_images if scorer.decode else model.sample_latents
    x = torch.cat([sample(min(batch, n - first), generator=generator, **options)
                   for first in range(0, n, batch)])
    return x if scorer.decode else x.reshape(n, -1)


class ScoreAtSteps(L.Callback):
    """Sample and score the model (its EMA where it has one) after the given training steps:
    what the run would score had it stopped there (with the learning rate of this longer run)."""

    def __init__(self, steps: list[int], score: Any) -> None:
        self.steps = set(steps)
        self.score = score
        self.by_step: dict[str, dict[str, float]] = {}
        self.seconds = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step in self.steps and str(step) not in self.by_step:
            start = time.perf_counter()
            self.by_step[str(step)] = self.score(pl_module)[0]
            self.seconds += time.perf_counter() - start


def _sample_and_score(model: Any, config: dict, scorer: Scorer, T: int, seed: int,
                      **options: Any) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    bench = bench_options(config)
    start = time.perf_counter()
    x = draw(model, scorer, n=int(bench["num_samples"]), batch=int(bench["sample_batch"]),
             generator=rng.generator(seed, SAMPLE_STREAM, T), **options)
    sample_s = time.perf_counter() - start
    return scorer.score(x, seed=seed), scorer.keep(x), sample_s


def _train(config: dict, job: Job, out_dir: Path, scorer: Scorer, T: int,
           score_steps: list[int]) -> tuple[Any, dict[str, Any]]:
    """Train ``job``'s run (``job.method`` at ``T``) in its folder; returns the model and what
    the training cost."""
    run = run_config(config, job.method, T, job.seed)
    run_dir = out_dir / "runs" / job.name
    run["run_dir"] = str(run_dir)
    trace = RunTrace()
    scoring = ScoreAtSteps(score_steps, lambda model: _sample_and_score(
        model, config, scorer, T, job.seed)) if score_steps else None
    callbacks = (trace, scoring) if scoring else (trace,)
    model, data, trainer = build_run(run, run_dir, extra_callbacks=callbacks)  # writes nothing
    shutil.rmtree(run_dir, ignore_errors=True)  # this job's earlier folder (checked to go)
    save_config(run, run_dir / "config.yaml")
    start = time.perf_counter()
    diverged_at = None
    try:
        trainer.fit(model, datamodule=data)
    except NonFiniteError:
        diverged_at = int(trainer.global_step)
    paused = scoring.seconds if scoring else 0.0
    cost = {"train_s": time.perf_counter() - start - paused, "steps": len(trace.losses),
            "ms_per_step": trace.ms_per_step(paused=paused), "final_loss": trace.final_loss(),
            "diverged_at": diverged_at}
    if scoring:
        cost["by_step"] = scoring.by_step
    return model, cost


def train_run(config: dict, job: Job, out_dir: Path) -> list[dict]:
    """Train run ``(method, T, seed)`` through the stage-2 path, sample and score it."""
    scorer = build_scorer(scorer_spec(config))
    steps = [s for s in bench_options(config)["score_steps"]
             if s < int((config.get("trainer") or {}).get("max_steps", -1) or -1)]
    model, cost = _train(config, job, out_dir, scorer, job.T, sorted(steps))
    metrics, kept, sample_s = _sample_and_score(model, config, scorer, job.T, job.seed)
    record = {"method": job.method, "T": job.T, "seed": job.seed, **metrics, **cost,
              "sample_s": sample_s}
    earlier.save_finished(out_dir / "runs" / job.name, [record], [kept],
                          earlier.scoring(config))  # what --resume keeps
    return [{**record, "kept": kept}]


def fast_run(config: dict, job: Job, out_dir: Path) -> list[dict]:
    """Train the base model of a seed once at ``T = base_T``, then sample it with every fast
    sampler at ``steps = T`` for each ``T`` of the job's list; ``job.reuse_base``: load the
    finished base model in the run folder instead, keep the rows it holds and sample the rest."""
    scorer = build_scorer(scorer_spec(config))
    run_dir = out_dir / "runs" / job.name
    base = earlier.reusable_base(run_dir, config=config, method=job.method, T=job.T,
                                 seed=job.seed) if job.reuse_base else None
    if base is not None:
        model, cost = load_diffusion_checkpoint(base.checkpoint), base.cost
    else:
        model, cost = _train(config, job, out_dir, scorer, job.T, [])
    held = {(r["method"], r["T"]): r for r in (base.records if base else ())}
    numeric = set(summary_keys(scorer.layout, list(held.values())))
    records, kept, new = [], [], []
    for name, T in job.rows(config):
        arrays = earlier.read_kept(run_dir, name, T) if (name, T) in held else None
        if arrays is not None:
            records.append(earlier.as_record(held[(name, T)], numeric))
            kept.append(arrays)
            continue
        options = fast_samplers(config)["samplers"][name]
        metrics, arrays, sample_s = _sample_and_score(
            model, config, scorer, T, job.seed, sampler=options.get("kind"), steps=T,
            spacing=options.get("spacing"), ddim_eta=options.get("ddim_eta"))
        records.append({"method": name, "T": T, "seed": job.seed, **metrics, **cost,
                        "sample_s": sample_s, "base_T": job.T, "sampler": dict(options)})
        kept.append(arrays)
        new.append(len(records) - 1)
    earlier.save_finished(run_dir, [records[i] for i in new], [kept[i] for i in new],
                          earlier.scoring(config, fast=True), earlier=base.records if base else ())
    return [{**r, "kept": k} for r, k in zip(records, kept, strict=True)]


def reference_run(config: dict, job: Job) -> list[dict]:
    """Score reference row ``job.method`` of the scorer at ``T`` (no training)."""
    scorer = build_scorer(scorer_spec(config))
    betas = instantiate(schedule_block(config["model"]["params"], job.T)).betas
    start = time.perf_counter()
    metrics, x = scorer.reference(job.method, betas=betas,
                                  num_samples=int(bench_options(config)["num_samples"]),
                                  generator=rng.generator(job.seed, SAMPLE_STREAM, job.T),
                                  seed=job.seed)
    record = {"method": job.method, "T": job.T, "seed": job.seed, **metrics, "train_s": 0.0,
              "sample_s": time.perf_counter() - start, "steps": 0, "ms_per_step": float("nan"),
              "final_loss": float("nan"), "diverged_at": None}
    return [{**record, "kept": scorer.keep(x) if x is not None else {}}]


def run_job(args: tuple[dict, Job, Path]) -> list[dict]:
    """Do one job (in this process or a worker's)."""
    config, job, out_dir = args
    if job.kind == "reference":
        return reference_run(config, job)
    if job.kind == "fast":
        return fast_run(config, job, out_dir)
    return train_run(config, job, out_dir)
