"""The known-truth benchmark's table layout, and its tables (:mod:`ldm_smd.eval.bench_report`).

The leading metric is the sliced Wasserstein distance to the mixture (its floor, a true sample's,
in brackets); the column beside it, the share of vanilla's excess SW over the exact posterior's
removed (``sw_removed``), is the headline figure, paired by seed against the
runs named ``vanilla`` and ``exact_posterior``. The functions below are those of
:mod:`~ldm_smd.eval.bench_report` with this layout, for scripts that read mixture benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ldm_smd.eval import bench_report
from ldm_smd.eval.bench_report import Layout

LEGEND = (
    "SW: sliced Wasserstein distance to the mixture (floor: a true sample's); SW removed: share "
    "of vanilla's excess SW (over the exact posterior's) removed, paired by seed (100% = exact "
    "posterior, 0% = vanilla); precision: share of samples within the 98.9%-mass radius of some "
    "mean; recall: share of modes holding >= 10% of their expected precise samples; KL: sampled "
    "mode histogram vs true weights; spread: std of precise samples around their mean / true std "
    "(1 is right; < 1 is collapse); logp: log-density under the true mixture; exact_posterior / "
    "best_gaussian: exact reference samplers, no network (SMD.md section 6).\n"
)
BASELINE, EXACT = "vanilla", "exact_posterior"
LAYOUT = Layout(
    metrics=("sw", "precision", "recall", "kl", "spread", "logp_mean", "logp_median"),
    better={"sw": "lower", "precision": "higher", "recall": "higher", "kl": "lower",
            "logp_mean": "higher", "logp_median": "higher"},
    ideal=EXACT, baseline=BASELINE, legend=LEGEND,
)


def aggregate(runs: list[dict], methods: Sequence[str], T_list: Sequence[int]) -> dict:
    """:func:`~ldm_smd.eval.bench_report.aggregate` with the mixture layout."""
    return bench_report.aggregate(runs, methods, T_list, LAYOUT)


def read_runs(results: str | os.PathLike) -> tuple[list[dict], list[str], list[int]]:
    """``(runs, methods, T_list)`` of a mixture benchmark's ``results.json`` or ``runs.jsonl``
    (:func:`~ldm_smd.eval.bench_report.read_runs`)."""
    runs, methods, T_list, _ = bench_report.read_runs(results, default=LAYOUT)
    return runs, methods, T_list
