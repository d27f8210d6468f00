"""What a finished benchmark writes into its folder: the tables, the JSON record, the plots.

- ``results.md``: what ran (config, seeds, training steps, samples per run, wall time), the
  legend, the table (:func:`ldm_smd.eval.bench_report.format_table`: mean ± sample std over seeds
  per row and T, the leading metric first, the cost of a run: ``train_s``, ``ms_per_step``,
  ``steps``) and, where runs were also scored during training (``bench.score_steps``), the
  leading metric at each of those steps;
- ``results.json``: every run, the summary, the layout and the config;
- ``metrics_vs_T.png``: every metric against T, every row; the scorer's pictures of the first
  seed (``scatter.png`` for mixtures, ``grids/<row>_T<T>.png`` for images);
- ``samples/<row>_T<T>_seed<seed>.npz``: the kept samples of the first seed (``samples`` for
  mixtures; ``images``, uint8 ``(N, H, W, C)`` as ``ldm-smd sample`` writes them, for images).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm_smd.bench.scorers import Scorer
from ldm_smd.bench.spec import bench_options, fast_samplers
from ldm_smd.eval.bench_report import Layout, aggregate, format_table, format_value
from ldm_smd.jsonio import write_json


def by_step_table(runs: Sequence[dict], rows: Sequence[str], T_list: Sequence[int],
                  layout: Layout) -> str:
    """Markdown: the leading metric (mean ± std over seeds) of each trained row and T at every
    step it was scored at during training, and at the end of training; empty without such."""
    steps = sorted({int(s) for r in runs for s in (r.get("by_step") or {})})
    if not steps:
        return ""
    lead = layout.lead
    head = ["T", "method", *(f"step {s}" for s in steps), "final"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in T_list:
        for row in rows:
            mine = [r for r in runs if r["method"] == row and r["T"] == T and r.get("by_step")]
            if not mine:
                continue
            cells = []
            for s in steps:
                vals = np.array([r["by_step"].get(str(s), {}).get(lead, np.nan) for r in mine],
                                dtype=float)
                cells.append(_mean_std(vals))
            cells.append(_mean_std(np.array([r[lead] for r in mine], dtype=float)))
            lines.append("| " + " | ".join([str(T), row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(vals: np.ndarray) -> str:
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return "—"
    return format_value([float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0])


def _header(config: dict, config_path: Any, seeds: Sequence[int], wall: float,
            layout: Layout) -> str:
    bench = bench_options(config)
    steps = (config.get("trainer") or {}).get("max_steps")
    fast = fast_samplers(config)
    lines = [f"# bench: {config_path}", "",
             f"{len(seeds)} seed(s) {list(seeds)}; {steps} training steps; "
             f"{bench['num_samples']} samples per run; the model's sampler over all T steps; "
             f"mean ± sample std over seeds; wall {wall:.0f} s", ""]
    first = (config["model"].get("params") or {}).get("first_stage", "identity")
    if first != "identity":
        scale = config["model"]["params"].get("scale_factor")
        scale = "its own" if scale is None else f"{scale:.6g}"
        lines += [f"first stage: {first} (scale factor {scale})", ""]
    legend = layout.legend.rstrip("\n")
    if fast:
        options = "; ".join(f"{name}: {dict(o)}" for name, o in fast["samplers"].items())
        legend += (f" {', '.join(fast['samplers'])}: one {fast['method']} model per seed "
                   f"trained at T = {fast['base_T']} (the same budget), sampled with T steps "
                   f"({options}); its train s, ms/step and steps are that model's.")
    return "\n".join([*lines, legend, "", ""])


def write_outputs(config: dict, config_path: Any, out: Path, runs: list[dict], rows: list[str],
                  T_list: list[int], seeds: list[int], wall: float,
                  scorer: Scorer) -> dict[str, Any]:
    """Write the folder's results (module docstring); returns ``{"summary", "runs", "table",
    "files", ...}``."""
    from ldm_smd.eval import plots

    layout = scorer.layout
    summary = aggregate(runs, rows, T_list, layout)
    table = format_table(summary, rows, T_list, layout)
    kept = {(r["method"], r["T"]): r["kept"] for r in runs
            if r["seed"] == seeds[0] and r.get("kept")}
    (out / "samples").mkdir(exist_ok=True)
    for (row, T), arrays in kept.items():
        np.savez_compressed(out / "samples" / f"{row}_T{T}_seed{seeds[0]}.npz", **arrays)
    metrics = [layout.lead, layout.gap_key, *layout.metrics[1:], "nonfinite"]
    files = {
        "table": str(out / "results.md"),
        "json": str(out / "results.json"),
        "metrics_plot": plots.metrics_vs_steps(summary, rows, T_list, out / "metrics_vs_T.png",
                                               metrics=metrics),
        **scorer.pictures(kept, rows, T_list, out),
    }
    steps_table = by_step_table(runs, rows, T_list, layout)
    text = _header(config, config_path, seeds, wall, layout) + table
    if steps_table:
        text += (f"\n## {layout.lead} at training steps (bench.score_steps; final: the end of "
                 "training)\n\n" + steps_table)
    Path(files["table"]).write_text(text)
    record = {
        "config": config, "config_file": str(config_path), "layout": layout.to_json(),
        "methods": rows, "T_list": T_list, "seeds": seeds, "wall_s": wall, "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "kept"} for r in runs],
    }
    write_json(files["json"], record)
    return {**record, "table": table, "files": files}
