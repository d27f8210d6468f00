"""Tables of any benchmark: run records -> per (row, T) mean ± sample std over seeds -> markdown.

Pure functions over run records (dicts with ``method``, ``T``, ``seed``, the scorer's metrics and
the time a run took: ``train_s``, ``ms_per_step``, ``steps``); no training, no files but the ones
:func:`read_runs` reads. What a table shows is a :class:`Layout`, given by the benchmark's scorer:
its metrics (the leading one first), which direction is better, and the reference row that a
perfect model would match (``ideal``). The column after the leading metric is the share of the
baseline's (``vanilla``'s) gap to the ideal row that a row closes on the leading metric, paired by
seed (:func:`gap_closed`; ``sw_removed`` on the mixtures, ``fd_removed`` on images).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: what every run record has besides the metrics: the cost of a run
TIME_KEYS = ("train_s", "sample_s", "ms_per_step", "steps")
#: the JSON file, beside ``runs.jsonl``, that holds a benchmark's layout from its start
DESCRIPTION_FILE = "bench.json"


@dataclass(frozen=True)
class Layout:
    """What a benchmark's table shows.

    Args:
        metrics: the scorer's metrics in table order; the first leads (first column, the gap).
        better: metric -> ``"lower"`` or ``"higher"`` (a metric left out has no better side).
        ideal: the reference row a perfect model would match (the gap's far end), if any.
        baseline: the row whose gap is measured (the gap's near end).
        legend: what the columns and reference rows mean (printed above the table).
    """

    metrics: tuple[str, ...]
    better: Mapping[str, str] = field(default_factory=dict)
    ideal: str | None = None
    baseline: str = "vanilla"
    legend: str = ""

    @property
    def lead(self) -> str:
        return self.metrics[0]

    @property
    def gap_key(self) -> str:
        """The summary key of the share of the baseline's gap closed: ``<lead>_removed``."""
        return f"{self.lead}_removed"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": list(self.metrics), "better": dict(self.better)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        return cls(**{**data, "metrics": tuple(data["metrics"])})


def gap_closed(baseline: float, value: float, ideal: float, better: str = "lower") -> float:
    """``(baseline - value) / (baseline - ideal)``: 1 where ``value`` reaches the ideal row, 0 at
    the baseline, negative when worse; nan where undefined (non-finite, or the baseline already
    at or beyond the ideal on the better side)."""
    denom = baseline - ideal
    if better == "higher":
        denom = -denom
    if not (math.isfinite(denom) and math.isfinite(value)) or denom <= 0:
        return float("nan")
    return (baseline - value) / (baseline - ideal)


def _value(run: Mapping[str, Any] | None, key: str) -> float:
    return float("nan") if run is None or run.get(key) is None else float(run[key])


def summary_keys(layout: Layout, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys a summary holds: the metrics, their ``_floor`` companions where runs have them,
    the gap, ``nonfinite`` and the cost of a run."""
    floors = [f"{m}_floor" for m in layout.metrics if any(f"{m}_floor" in r for r in runs)]
    return [*layout.metrics, *floors, layout.gap_key, "nonfinite", *TIME_KEYS]


def aggregate(runs: list[dict], methods: Sequence[str], T_list: Sequence[int],
              layout: Layout) -> dict:
    """``{row: {str(T): {key: [mean, sample std]}}}`` over seeds; sets each run's gap
    (``layout.gap_key``), paired by seed against the baseline and ideal runs of its T."""
    by_key = {(r["method"], r["T"], r["seed"]): r for r in runs}
    direction = layout.better.get(layout.lead, "lower")
    for r in runs:
        base = by_key.get((layout.baseline, r["T"], r["seed"]))
        ideal = by_key.get((layout.ideal, r["T"], r["seed"])) if layout.ideal else None
        r[layout.gap_key] = gap_closed(_value(base, layout.lead), _value(r, layout.lead),
                                       _value(ideal, layout.lead), direction)
    keys = summary_keys(layout, runs)
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in methods:
        for T in T_list:
            rows = [r for r in runs if r["method"] == method and r["T"] == T]
            if not rows:
                continue
            stats = {}
            for key in keys:
                vals = np.array([_value(r, key) for r in rows], dtype=np.float64)
                if key == layout.gap_key:  # undefined where the baseline is at the ideal
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


def _digits(value: float) -> int:
    return 3 if abs(value) < 10 else (2 if abs(value) < 100 else 1)


def format_value(v: Sequence[float], digits: int | None = None) -> str:
    """``mean ± std`` with ``digits`` decimals (default: 3 below 10, 2 below 100, else 1)."""
    mean, std = v
    if not math.isfinite(mean):
        return "nan"
    d = _digits(mean) if digits is None else digits
    return f"{mean:.{d}f} ± {std:.{d}f}"


def _header(metric: str, layout: Layout) -> str:
    arrow = {"lower": " ↓", "higher": " ↑"}.get(layout.better.get(metric, ""), "")
    return f"{metric}{arrow}"


def format_table(summary: Mapping, methods: Sequence[str], T_list: Sequence[int],
                 layout: Layout) -> str:
    """Markdown: one row per (T, row), mean ± sample std over seeds; the leading metric (with
    its floor in brackets where runs have one) and the share of the baseline's gap closed first,
    then the other metrics, the non-finite runs and the cost of a run."""
    lead, rest = layout.lead, layout.metrics[1:]
    has_floor = any(f"{lead}_floor" in s for m in summary.values() for s in m.values())
    head = ["T", "method", _header(lead, layout) + (" (floor)" if has_floor else ""),
            f"{lead} removed", *(_header(m, layout) for m in rest), "non-finite runs",
            "train s", "ms/step", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    no_gap = {layout.baseline, layout.ideal}
    for T in T_list:
        for method in methods:
            s = summary.get(method, {}).get(str(T))
            if s is None:
                continue
            first = format_value(s[lead])
            if has_floor:
                floor = s.get(f"{lead}_floor", [float("nan")])[0]
                first += f" ({floor:.{_digits(floor) if math.isfinite(floor) else 0}f})"
            gap = s[layout.gap_key]  # nan without the baseline (or ideal) runs of this T
            removed = "—" if method in no_gap or not math.isfinite(gap[0]) else (
                format_value([100 * gap[0], 100 * gap[1]], 0) + " %")
            cost = [s[k][0] for k in ("train_s", "ms_per_step", "steps")]
            cells = [str(T), method, first, removed, *(format_value(s[m]) for m in rest),
                     f"{int(s['n_nonfinite_runs'][0])}/{int(s['n_seeds'][0])}",
                     *("—" if not math.isfinite(v) or v == 0 else f"{v:.0f}" for v in cost)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_runs(results: str | os.PathLike, *, default: Layout | None = None
              ) -> tuple[list[dict], list[str], list[int], Layout]:
    """``(runs, rows, T_list, layout)`` from a ``results.json``, or from the ``runs.jsonl`` of a
    benchmark still going or stopped (whatever runs it holds; rows in order of appearance; the
    layout from the ``bench.json`` beside it, else ``default``); a missing metric (``null``)
    becomes NaN."""
    path = Path(results)
    if path.suffix == ".jsonl":
        raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        methods = list(dict.fromkeys(r["method"] for r in raw))
        T_list = sorted({r["T"] for r in raw})
        described = path.parent / DESCRIPTION_FILE
        data = json.loads(described.read_text()) if described.is_file() else {}
    else:
        data = json.loads(path.read_text())
        raw, methods, T_list = data["runs"], data["methods"], data["T_list"]
    if "layout" in data:
        layout = Layout.from_json(data["layout"])
    elif default is not None:
        layout = default
    else:
        raise ValueError(f"{path}: no layout (no {DESCRIPTION_FILE} beside it)")
    numeric = set(summary_keys(layout, raw))
    runs = [{k: (float("nan") if v is None and k in numeric else v) for k, v in r.items()}
            for r in raw]
    return runs, methods, T_list, layout


def tabulate_results(results: str | os.PathLike, *, default: Layout | None = None) -> str:
    """Rebuild the markdown table from a ``results.json`` or ``runs.jsonl`` (:func:`read_runs`)."""
    runs, methods, T_list, layout = read_runs(results, default=default)
    return format_table(aggregate(runs, methods, T_list, layout), methods, T_list, layout)
