"""Rows, the markdown table and the goal lines of ``scripts/benchmark.py`` (one job: report).

Pure functions over the timed cases (objects with ``name``, ``width``, ``kernels`` (the kernel
set's spec), ``params``, ``eta_samples`` and the lists ``train_ms``, ``sample_ms``,
``train_cpu_ms``, ``sample_cpu_ms``) and the memory figures; nothing here times or builds
anything.
"""

from __future__ import annotations

import statistics


def make_rows(states: list, memory: dict[tuple[str, int, str], dict]) -> list[dict]:
    """One JSON row per case and kernel set, with medians and ratios against the vanilla of the
    same width and kernel set; ``memory`` is keyed by (case, width, kernels). Names carry the
    kernel set (``case@wW[kernels]``) when there are several."""
    rows = []
    base = {(s.width, s.kernels): s for s in states if s.name == "vanilla"}
    several = len({s.kernels for s in states}) > 1
    for s in states:
        row: dict[str, object] = {
            "name": f"{s.name}@w{s.width}" + (f"[{s.kernels}]" if several else ""),
            "case": s.name, "width": s.width, "kernels": s.kernels,
            "params": s.params, "train_step_ms": statistics.median(s.train_ms),
            "sample_step_ms": statistics.median(s.sample_ms),
            "peak_mem_mb": None, "eta_samples": s.eta_samples,
            "train_step_ms_per_eta": statistics.median(s.train_ms) / s.eta_samples,
            "train_step_ms_all": [round(v, 2) for v in s.train_ms],
            "sample_step_ms_all": [round(v, 2) for v in s.sample_ms],
            "train_step_cpu_ms": statistics.median(s.train_cpu_ms),
            "sample_step_cpu_ms": statistics.median(s.sample_cpu_ms),
        }
        row.update(memory.get((s.name, s.width, s.kernels), {}))
        van = base.get((s.width, s.kernels))
        if van is not None:
            row["train_ratio_vs_vanilla"] = row["train_step_ms"] / statistics.median(van.train_ms)
            row["train_ratio_per_eta_vs_vanilla"] = (
                row["train_step_ms_per_eta"] / statistics.median(van.train_ms))
            row["sample_ratio_vs_vanilla"] = (
                row["sample_step_ms"] / statistics.median(van.sample_ms))
            row["train_cpu_ratio_vs_vanilla"] = (
                row["train_step_cpu_ms"] / statistics.median(van.train_cpu_ms))
            row["sample_cpu_ratio_vs_vanilla"] = (
                row["sample_step_cpu_ms"] / statistics.median(van.sample_cpu_ms))
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (wall-clock medians; CPU-time ratios beside them)."""
    lines = ["| case | width | kernels | params | train step ms | train / vanilla (cpu) | "
             "sample step ms | sample / vanilla (cpu) | peak RSS MB | train adds MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = _fmt(r["train_step_ms"], ".1f")
        ratio = (f"{_fmt(r.get('train_ratio_vs_vanilla'), '.3f')} "
                 f"({_fmt(r.get('train_cpu_ratio_vs_vanilla'), '.3f')})")
        if r["eta_samples"] > 1:
            train += f" ({r['train_step_ms_per_eta']:.1f} per eta)"
            ratio += f"; per eta {r.get('train_ratio_per_eta_vs_vanilla', 0):.3f}"
        sample = (f"{_fmt(r.get('sample_ratio_vs_vanilla'), '.3f')} "
                  f"({_fmt(r.get('sample_cpu_ratio_vs_vanilla'), '.3f')})")
        lines.append(
            f"| {r['case']} | {r['width']} | {r['kernels']} | {r['params']:,} | {train} | "
            f"{ratio} | "
            f"{_fmt(r['sample_step_ms'], '.1f')} | {sample} | {_fmt(r['peak_mem_mb'], '.0f')} | "
            f"{_fmt(r.get('train_mem_mb'), '.0f')} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """Lines stating each goal and whether this run met it, on wall-clock and on CPU time, per
    kernel set; then each further kernel set against the first, case by case."""
    out = []
    sets = list(dict.fromkeys(r["kernels"] for r in rows))
    for kernels in sets:
        label = f" [kernels {kernels}]" if len(sets) > 1 else ""
        out += [line + label for line in _goals_of({(r["case"], r["width"]): r for r in rows
                                                     if r["kernels"] == kernels})]
    first = {(r["case"], r["width"]): r for r in rows if r["kernels"] == sets[0]}
    for r in rows:
        ref = first.get((r["case"], r["width"]))
        if r["kernels"] != sets[0] and ref is not None:
            out.append(f"w{r['width']} {r['case']}: kernels {r['kernels']} / {sets[0]}: train "
                       f"{_ratio(r, ref, 'train_step')}, sample {_ratio(r, ref, 'sample_step')}")
    return out


def _ratio(a: dict, b: dict, key: str) -> str:
    wall, cpu = a[key + "_ms"] / b[key + "_ms"], a[key + "_cpu_ms"] / b[key + "_cpu_ms"]
    return f"{wall:.3f}x (cpu {cpu:.3f}x)"


def _goals_of(by: dict[tuple[str, int], dict]) -> list[str]:
    """The goal lines of one kernel set's rows, keyed by (case, width)."""
    out = []
    for width in sorted({width for _, width in by}):
        van, smd = by.get(("vanilla", width)), by.get(("smd_paper", width))
        if van and smd:
            worst = max(smd["train_step_ms"] / van["train_step_ms"],
                        smd["sample_step_ms"] / van["sample_step_ms"])
            out.append(f"w{width}: SMD/vanilla train {_ratio(smd, van, 'train_step')}, sample "
                       f"{_ratio(smd, van, 'sample_step')} (goal <= 1.10x, wall): "
                       f"{'MET' if worst <= 1.10 else 'MISSED'}")
        for name in ("smd_energy_M4", "smd_energy_M8"):
            energy = by.get((name, width))
            if van and energy:
                train = energy["train_step_ms"] / van["train_step_ms"]
                out.append(f"w{width}: {name} (placement output, draws share one backbone pass)"
                           f"/vanilla train {_ratio(energy, van, 'train_step')}, sample "
                           f"{_ratio(energy, van, 'sample_step')} (goal for the default SMD: "
                           f"train <= 1.3x, wall): {'MET' if train <= 1.3 else 'MISSED'}")
        for name in ("smd_image_M2", "smd_image_M4", "smd_deviation_M4"):
            image = by.get((name, width))
            if van and image:
                train = image["train_step_ms"] / van["train_step_ms"]
                sample = image["sample_step_ms"] / van["sample_step_ms"]
                shared = ("the backbone's pass, a deviation head per draw"
                          if name.startswith("smd_deviation") else "the encoder's pass")
                out.append(f"w{width}: {name} (per-picture latent, draws share {shared})"
                           f"/vanilla train {_ratio(image, van, 'train_step')}, sample "
                           f"{_ratio(image, van, 'sample_step')} (goal for the image default: "
                           f"train <= 1.5x, sample <= 1.15x, wall): "
                           f"{'MET' if train <= 1.5 and sample <= 1.15 else 'MISSED'}")
        ref = by.get(("smd_reference_dxd", width))
        if smd and ref:
            out.append(f"w{width}: reference d x d form / our O(d) SMD: train "
                       f"{_ratio(ref, smd, 'train_step')}, sample "
                       f"{_ratio(ref, smd, 'sample_step')}")
        dif = by.get(("diffusers_unet2d", width))
        if van and dif:
            speed = dif["train_step_ms"] / van["train_step_ms"]
            out.append(f"w{width}: params ours {van['params']:,} vs UNet2DModel {dif['params']:,}"
                       f"; UNet2DModel / ours train {_ratio(dif, van, 'train_step')} (goal >= 1.2x,"
                       f" wall): {'MET' if speed >= 1.2 else 'MISSED'}; sample "
                       f"{_ratio(dif, van, 'sample_step')}")
    return out
