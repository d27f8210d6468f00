"""The known-truth Gaussian-mixture benchmark (``ldm-smd bench-mixture``), SMD.md section 6.

For every method (``vanilla``, ``smd_paper``, ``smd_mixture``), every number of steps ``T`` and
every seed: train a denoiser on a ``T``-step schedule with a plain PyTorch loop (MLP for vectors,
UNet for image prototypes; wrapped in :class:`~ldm_smd.nn.smd.SMDNetwork` for the SMD methods),
draw samples with the DDPM sampler over all ``T`` steps, and score them exactly
(:mod:`ldm_smd.eval.mixture_metrics`). Two reference rows per ``T`` and seed need no training:
``exact_posterior`` (a perfect SMD) and ``best_gaussian`` (a perfect vanilla denoiser).

Seeds: run ``(method, T, seed)`` initialises its network with ``torch.manual_seed(seed)`` (so
the three methods start from the same backbone), draws training data with generator
``seed + 10_007`` and timesteps / noise / eta with ``seed``, samples with ``seed + 777`` and is
scored against fresh data drawn with ``seed`` (shared by every method and reference row of that
seed, so comparisons are paired). ``workers`` changes results only by float rounding
(thread counts change summation order).

Outputs in ``out_dir``: ``results.md`` (mean +- sample std over seeds), ``results.json`` (every
run and the summary), ``scatter.png`` (samples of the first seed, per method and T),
``metrics_vs_T.png``, ``runs.jsonl`` (each run as it finishes) and
``samples/<method>_T<T>_seed<seed>.npz`` for the first seed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ldm_smd.config import instantiate
from ldm_smd.data.mixtures import GaussianMixture, build_mixture
from ldm_smd.diffusion.objectives import build_objective
from ldm_smd.diffusion.samplers import sample
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.eval import mixture_metrics as mm

METHODS = ("vanilla", "smd_paper", "smd_mixture", "smd_energy")
REFERENCES = ("exact_posterior", "best_gaussian")
TOP_KEYS = {"mixture", "schedule", "parameterization", "network", "smd", "objective",
            "objectives", "train", "bench", "quick"}
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 2000, "batch_size": 256, "lr": 2e-3, "lr_schedule": "cosine", "weight_decay": 0.0,
    "grad_clip": 1.0, "ema_decay": 0.0,
}
BENCH_DEFAULTS: dict[str, Any] = {
    "methods": ["vanilla", "smd_paper", "smd_mixture"], "T_list": [2, 5, 10, 20, 50],
    "seeds": [0, 1, 2], "num_samples": 4000, "num_projections": 256, "sample_batch": 4000,
    "workers": 1,
    "threads_per_worker": 1, "references": True,
}
LEGEND = (
    "precision: share of samples within the 98.9%-mass radius of some mean; recall: share of "
    "modes holding >= 10% of their expected precise samples; KL: sampled mode histogram vs true "
    "weights; spread: std of precise samples around their mean / true std (1 is right; < 1 is "
    "collapse); logp: log-density under the true mixture; SW: sliced Wasserstein distance to "
    "fresh data (floor: two true samples); SW removed: share of vanilla's excess SW (over the "
    "exact posterior's) removed, paired by seed (100% = exact posterior, 0% = vanilla); "
    "exact_posterior / best_gaussian: exact reference samplers, no network (SMD.md section 6).\n"
)
METRIC_KEYS = ("precision", "recall", "kl", "spread", "logp_mean", "logp_median", "sw",
               "sw_floor", "sw_removed", "nonfinite", "train_s")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _checked(section: str, values: dict, defaults: dict, path: str) -> dict:
    unknown = sorted(set(values or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {unknown} in '{section}'; valid: {sorted(defaults)}"
        )
    return {**defaults, **(values or {})}


def load_config(config_path: str | os.PathLike, *, quick: bool = False) -> dict[str, Any]:
    """Read a benchmark YAML, apply its ``quick:`` overrides if asked, fill and check defaults."""
    path = str(config_path)
    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; valid: {sorted(TOP_KEYS)}")
    if "mixture" not in cfg or "network" not in cfg:
        raise ValueError(f"{path}: needs 'mixture' and 'network' sections")
    if quick:
        cfg = _merge(cfg, cfg.get("quick") or {})
    cfg.pop("quick", None)
    cfg["train"] = _checked("train", cfg.get("train"), TRAIN_DEFAULTS, path)
    cfg["bench"] = _checked("bench", cfg.get("bench"), BENCH_DEFAULTS, path)
    cfg.setdefault("schedule", {"kind": "cosine"})
    cfg.setdefault("parameterization", "eps")
    cfg.setdefault("smd", {})
    cfg.setdefault("objective", {})
    cfg.setdefault("objectives", {})
    bad = sorted(set(cfg["objectives"]) - set(METHODS))
    if bad:
        raise ValueError(f"{path}: 'objectives' has unknown methods {bad}; valid: {list(METHODS)}")
    cfg["config_path"] = path
    return cfg


def build_network(cfg: dict[str, Any], method: str, mixture: GaussianMixture) -> torch.nn.Module:
    """The backbone of ``cfg['network']``, wrapped in SMDNetwork for the SMD methods."""
    spec = cfg["network"]
    if mixture.image_shape is not None:
        extra = {"in_channels": mixture.image_shape[0], "out_channels": mixture.image_shape[0]}
    else:
        extra = {"dim": mixture.dim}
    # the mixture fixes the data shape; the config's params give everything else
    params = {**extra, **(spec.get("params") or {})}
    backbone = instantiate({"target": spec.get("target"), "params": params})
    if method == "vanilla":
        return backbone
    from ldm_smd.nn.smd import SMDNetwork

    return SMDNetwork(backbone=backbone, **cfg["smd"])


def _shape(mixture: GaussianMixture, n: int) -> tuple[int, ...]:
    return (n, *mixture.image_shape) if mixture.image_shape is not None else (n, mixture.dim)


def train_and_sample(cfg: dict[str, Any], method: str, T: int, seed: int) -> dict[str, Any]:
    """Train one model and score its samples; returns the run's record (samples included)."""
    tr = cfg["train"]
    mixture = build_mixture(cfg["mixture"])
    schedule = NoiseSchedule(**cfg["schedule"], num_timesteps=T)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network(cfg, method, mixture)
    params = {"parameterization": cfg["parameterization"], **cfg["objective"],
              **(cfg["objectives"].get(method) or {})}
    objective = build_objective(method, **params)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tr["lr"]),
                            weight_decay=float(tr["weight_decay"]))
    steps = int(tr["steps"])
    if tr["lr_schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    elif tr["lr_schedule"] == "constant":
        sched = None
    else:
        raise ValueError(f"train.lr_schedule={tr['lr_schedule']!r}: use 'cosine' or 'constant'")
    ema_decay = float(tr["ema_decay"])
    ema = [p.detach().clone() for p in net.parameters()] if ema_decay > 0 else None
    data_g = torch.Generator().manual_seed(seed + 10_007)
    g = torch.Generator().manual_seed(seed)
    net.train()
    t0 = time.perf_counter()
    losses, diverged_at = [], None
    for step in range(steps):
        x0 = mixture.sample(int(tr["batch_size"]), generator=data_g)[0]
        if mixture.image_shape is not None:
            x0 = mixture.to_images(x0)
        loss, _ = objective(net, x0, schedule=schedule, generator=g)
        if not torch.isfinite(loss):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if float(tr["grad_clip"]) > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), float(tr["grad_clip"]))
        opt.step()
        if sched is not None:
            sched.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, net.parameters(), strict=True):
                    e.lerp_(p.detach(), 1 - ema_decay)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t0
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, net.parameters(), strict=True):
                p.copy_(e)
    net.eval()
    t0 = time.perf_counter()
    x = _sample_model(net, cfg, mixture, schedule, seed)
    sample_s = time.perf_counter() - t0
    record = _score(x, mixture, cfg, method, T, seed)
    tail = losses[-max(1, len(losses) // 10):]
    record.update(train_s=train_s, sample_s=sample_s, steps=len(losses),
                  final_loss=float(np.mean(tail)) if tail else float("nan"),
                  diverged_at=diverged_at)
    return record


@torch.no_grad()
def _sample_model(net, cfg, mixture, schedule, seed) -> torch.Tensor:
    n, batch = int(cfg["bench"]["num_samples"]), int(cfg["bench"]["sample_batch"])
    g = torch.Generator().manual_seed(seed + 777)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        out.append(sample(lambda x, t, gen: net(x, t, generator=gen), _shape(mixture, m),
                          schedule=schedule, parameterization=cfg["parameterization"],
                          sampler="ddpm", steps=schedule.num_timesteps, generator=g))
    return torch.cat(out).reshape(n, -1)


def _score(x, mixture, cfg, method, T, seed) -> dict[str, Any]:
    metrics = mm.mixture_metrics(x, mixture, seed=seed,
                                 num_projections=int(cfg["bench"]["num_projections"]))
    return {"method": method, "T": T, "seed": seed, **metrics,
            "samples": x[:4000].to(torch.float32).numpy()}


def reference_run(cfg: dict[str, Any], method: str, T: int, seed: int) -> dict[str, Any]:
    """Score the exact-posterior or best-Gaussian sampler at ``T`` (no training)."""
    mixture = build_mixture(cfg["mixture"])
    betas = NoiseSchedule(**cfg["schedule"], num_timesteps=T).betas
    g = torch.Generator().manual_seed(seed + 777)
    n = int(cfg["bench"]["num_samples"])
    t0 = time.perf_counter()
    if method == "exact_posterior":
        x = mm.exact_posterior_sample(mixture, betas, n, generator=g)
    else:
        x = mm.best_gaussian_sample(mixture, betas, n, generator=g)
    record = _score(x, mixture, cfg, method, T, seed)
    record.update(train_s=0.0, sample_s=time.perf_counter() - t0, steps=0,
                  final_loss=float("nan"), diverged_at=None)
    return record


def _job(args: tuple) -> dict[str, Any]:
    cfg, method, T, seed = args
    fn = reference_run if method in REFERENCES else train_and_sample
    return fn(cfg, method, T, seed)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _aggregate(runs: list[dict], methods: list[str], T_list: list[int]) -> dict:
    by_key = {(r["method"], r["T"], r["seed"]): r for r in runs}

    def sw(r: dict | None) -> float:
        return float("nan") if r is None or r["sw"] is None else float(r["sw"])

    for r in runs:  # headline: share of vanilla's excess SW removed, paired by seed
        van = by_key.get(("vanilla", r["T"], r["seed"]))
        ex = by_key.get(("exact_posterior", r["T"], r["seed"]))
        r["sw_removed"] = mm.excess_sw_removed(sw(van), sw(r), sw(ex))
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in methods:
        for T in T_list:
            rows = [r for r in runs if r["method"] == method and r["T"] == T]
            if not rows:
                continue
            stats = {}
            for key in METRIC_KEYS:
                vals = np.array([np.nan if r[key] is None else r[key] for r in rows],
                                dtype=np.float64)
                if key == "sw_removed":  # undefined where vanilla is already at the exact SW
                    vals = vals[np.isfinite(vals)]
                if len(vals) == 0:
                    stats[key] = [float("nan"), float("nan")]
                    continue
                std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                stats[key] = [float(vals.mean()), std]
            stats["n_seeds"] = [len(rows), 0.0]
            stats["n_nonfinite_runs"] = [sum(r["nonfinite"] > 0 for r in rows), 0.0]
            summary.setdefault(method, {})[str(T)] = stats
    return summary


def _fmt(v: list[float], digits: int = 3) -> str:
    mean, std = v
    if not math.isfinite(mean):
        return "nan"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(summary: dict, methods: list[str], T_list: list[int]) -> str:
    """Markdown: one row per (T, method), mean ± sample std over seeds."""
    head = ("| T | method | precision | recall | KL | spread | logp mean | logp median | "
            "SW (floor) | SW removed | non-finite runs | train s |")
    lines = [head, "|" + "---|" * 12]
    for T in T_list:
        for method in methods:
            s = summary.get(method, {}).get(str(T))
            if s is None:
                continue
            removed = "—" if method in ("vanilla", "exact_posterior") else (
                _fmt([100 * s["sw_removed"][0], 100 * s["sw_removed"][1]], 0) + " %")
            lines.append(
                f"| {T} | {method} | {_fmt(s['precision'])} | {_fmt(s['recall'], 2)} | "
                f"{_fmt(s['kl'])} | {_fmt(s['spread'], 2)} | {_fmt(s['logp_mean'], 2)} | "
                f"{_fmt(s['logp_median'], 2)} | {_fmt(s['sw'])} ({s['sw_floor'][0]:.3f}) | "
                f"{removed} | {int(s['n_nonfinite_runs'][0])}/{int(s['n_seeds'][0])} | "
                f"{s['train_s'][0]:.0f} |"
            )
    return "\n".join(lines) + "\n"


def run_mixture_benchmark(
    config_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    methods: list[str] | None = None,
    T_list: list[int] | None = None,
    seeds: list[int] | None = None,
    quick: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark of ``config_path``; write table, JSON and plots to ``out_dir``.

    ``methods``, ``T_list`` and ``seeds`` override the config's ``bench`` section; ``quick``
    applies its ``quick:`` overrides (a smoke run); ``workers`` (default ``bench.workers``)
    runs that many training jobs in parallel processes with ``bench.threads_per_worker``
    threads each. Returns ``{"summary", "runs", "table", "files", ...}``.
    """
    from ldm_smd.eval import plots

    cfg = load_config(config_path, quick=quick)
    bench = cfg["bench"]
    methods = list(methods or bench["methods"])
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {list(METHODS)}")
    T_list = [int(t) for t in (T_list or bench["T_list"])]
    seeds = [int(s) for s in (seeds if seeds is not None else bench["seeds"])]
    refs = list(REFERENCES) if bench["references"] else []
    # seed by seed (a stopped run still has whole seeds in runs.jsonl), costliest job first
    jobs = []
    for s in seeds:
        trained = [(cfg, m, T, s) for m in methods for T in T_list]
        trained.sort(key=lambda j: (-METHODS.index(j[1]), -j[2]))
        jobs += trained + [(cfg, m, T, s) for m in refs for T in T_list]
    workers = int(workers if workers is not None else bench["workers"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="bench-mixture", disable=not progress)
    log = out / "runs.jsonl"  # one line per finished run, written as they come in
    log.write_text("")

    def collect(rec: dict[str, Any]) -> None:
        runs.append(rec)
        with log.open("a") as fh:
            fh.write(json.dumps(_clean({k: v for k, v in rec.items() if k != "samples"}),
                                default=_json_safe) + "\n")
        bar.update(1)

    if workers <= 1:
        for job in jobs:
            collect(_job(job))
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(int(bench["threads_per_worker"]),)) as pool:
            for rec in pool.map(_job, jobs):
                collect(rec)
    bar.close()
    wall = time.perf_counter() - t0
    all_methods = methods + refs
    summary = _aggregate(runs, all_methods, T_list)
    table = format_table(summary, all_methods, T_list)
    mixture = build_mixture(cfg["mixture"])
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
    header = (f"# bench-mixture: {cfg['config_path']}\n\n{len(seeds)} seed(s) {seeds}; "
              f"{bench['num_samples']} samples per run; DDPM sampler over all T steps; "
              f"mean ± sample std over seeds; SW floor in brackets; wall {wall:.0f} s\n\n"
              f"{LEGEND}\n")
    Path(files["table"]).write_text(header + table)
    record = {
        "config": cfg, "mixture": mixture.describe(), "methods": all_methods, "T_list": T_list,
        "seeds": seeds, "wall_s": wall, "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
    }
    Path(files["json"]).write_text(
        json.dumps(_clean(record), indent=1, default=_json_safe, allow_nan=False) + "\n"
    )
    return {**record, "table": table, "files": files}


def tabulate_results(results: str | os.PathLike) -> str:
    """Rebuild the markdown table from ``results.json``, or from the ``runs.jsonl`` of a run
    that is still going or was stopped (whatever runs it holds)."""
    path = Path(results)
    if path.suffix == ".jsonl":
        raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        order = list(METHODS) + list(REFERENCES)
        methods = sorted({r["method"] for r in raw}, key=order.index)
        T_list = sorted({r["T"] for r in raw})
    else:
        data = json.loads(path.read_text())
        raw, methods, T_list = data["runs"], data["methods"], data["T_list"]
    runs = [{k: (float("nan") if v is None and k in METRIC_KEYS else v) for k, v in r.items()}
            for r in raw]
    return format_table(_aggregate(runs, methods, T_list), methods, T_list)


def _clean(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
