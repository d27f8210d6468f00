"""Tables of the known-truth benchmark: runs -> per (method, T) mean ± std over seeds.

Pure functions over run records (dicts with ``method``, ``T``, ``seed`` and the metrics of
:func:`ldm_smd.eval.mixture_metrics.mixture_metrics`); no training, no files but the ones read by
:func:`tabulate_results`. The headline column, the share of vanilla's excess sliced Wasserstein
distance removed, is paired by seed against the runs named ``vanilla`` and ``exact_posterior``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ldm_smd.eval.mixture_metrics import excess_sw_removed

LEGEND = (
    "precision: share of samples within the 98.9%-mass radius of some mean; recall: share of "
    "modes holding >= 10% of their expected precise samples; KL: sampled mode histogram vs true "
    "weights; spread: std of precise samples around their mean / true std (1 is right; < 1 is "
    "collapse); logp: log-density under the true mixture; SW: sliced Wasserstein distance to "
    "the mixture (floor: a true sample's); SW removed: share of vanilla's excess SW (over the "
    "exact posterior's) removed, paired by seed (100% = exact posterior, 0% = vanilla); "
    "exact_posterior / best_gaussian: exact reference samplers, no network (SMD.md section 6).\n"
)
METRIC_KEYS = ("precision", "recall", "kl", "spread", "logp_mean", "logp_median", "sw",
               "sw_floor", "sw_removed", "nonfinite", "train_s")
BASELINE, EXACT = "vanilla", "exact_posterior"


def _sw(run: dict | None) -> float:
    return float("nan") if run is None or run.get("sw") is None else float(run["sw"])


def aggregate(runs: list[dict], methods: list[str], T_list: list[int]) -> dict:
    """``{method: {str(T): {metric: [mean, sample std]}}}``; sets each run's ``sw_removed``."""
    by_key = {(r["method"], r["T"], r["seed"]): r for r in runs}
    for r in runs:
        van = by_key.get((BASELINE, r["T"], r["seed"]))
        ex = by_key.get((EXACT, r["T"], r["seed"]))
        r["sw_removed"] = excess_sw_removed(_sw(van), _sw(r), _sw(ex))
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in methods:
        for T in T_list:
            rows = [r for r in runs if r["method"] == method and r["T"] == T]
            if not rows:
                continue
            stats = {}
            for key in METRIC_KEYS:
                vals = np.array([np.nan if r.get(key) is None else r[key] for r in rows],
                                dtype=np.float64)
                if key == "sw_removed":  # undefined where vanilla is already at the exact SW
                    vals = vals[np.isfinite(vals)]
                if len(vals) == 0:
                    stats[key] = [float("nan"), float("nan")]
                    continue
                std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                stats[key] = [float(vals.mean()), std]
            stats["n_seeds"] = [len(rows), 0.0]
            stats["n_nonfinite_runs"] = [sum((r.get("nonfinite") or 0) > 0 for r in rows), 0.0]
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
            removed = "—" if method in (BASELINE, EXACT) else (
                _fmt([100 * s["sw_removed"][0], 100 * s["sw_removed"][1]], 0) + " %")
            lines.append(
                f"| {T} | {method} | {_fmt(s['precision'])} | {_fmt(s['recall'], 2)} | "
                f"{_fmt(s['kl'])} | {_fmt(s['spread'], 2)} | {_fmt(s['logp_mean'], 2)} | "
                f"{_fmt(s['logp_median'], 2)} | {_fmt(s['sw'])} ({s['sw_floor'][0]:.3f}) | "
                f"{removed} | {int(s['n_nonfinite_runs'][0])}/{int(s['n_seeds'][0])} | "
                f"{s['train_s'][0]:.0f} |"
            )
    return "\n".join(lines) + "\n"


def read_runs(results: str | os.PathLike) -> tuple[list[dict], list[str], list[int]]:
    """``(runs, methods, T_list)`` from a ``results.json``, or from the ``runs.jsonl`` of a run
    that is still going or was stopped (whatever runs it holds; methods in order of appearance);
    missing metrics (``null``) become NaN."""
    path = Path(results)
    if path.suffix == ".jsonl":
        raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        methods = list(dict.fromkeys(r["method"] for r in raw))
        T_list = sorted({r["T"] for r in raw})
    else:
        data = json.loads(path.read_text())
        raw, methods, T_list = data["runs"], data["methods"], data["T_list"]
    runs = [{k: (float("nan") if v is None and k in METRIC_KEYS else v) for k, v in r.items()}
            for r in raw]
    return runs, methods, T_list


def tabulate_results(results: str | os.PathLike) -> str:
    """Rebuild the markdown table from a ``results.json`` or ``runs.jsonl`` (:func:`read_runs`)."""
    runs, methods, T_list = read_runs(results)
    return format_table(aggregate(runs, methods, T_list), methods, T_list)
