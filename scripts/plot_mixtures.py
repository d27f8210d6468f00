"""Several mixture benchmarks in one figure: excess SW removed and SW against T, one column each.

    python scripts/plot_mixtures.py ring8=runs/mixture/ring8/results.json \\
        grid25=runs/mixture/grid25/results.json --out mixtures_vs_T.png

Each ``NAME=FILE[,FILE...]`` names a column; its files (``results.json``, or the ``runs.jsonl`` of
a benchmark still going, or several of them for seeds run in separate folders) are merged and
aggregated as ``ldm-smd bench-mixture`` does (mean ± std over seeds, removal paired by seed).
"""

from __future__ import annotations

import argparse

from ldm_smd.eval import plots
from ldm_smd.eval.mixture_report import aggregate, read_runs


def summaries(columns: list[str]) -> tuple[dict, list[str]]:
    """``({name: summary}, methods)`` from ``NAME=FILE[,FILE...]`` items."""
    out, methods = {}, []
    for item in columns:
        name, sep, files = item.partition("=")
        if not sep or not files:
            raise SystemExit(f"plot_mixtures: {item!r} is not NAME=FILE[,FILE...]")
        runs, T_list = [], set()
        for file in files.split(","):
            more, names, ts = read_runs(file)
            runs += more
            T_list |= set(ts)
            methods += [m for m in names if m not in methods]
        present = [m for m in methods if any(r["method"] == m for r in runs)]
        out[name] = aggregate(runs, present, sorted(T_list))
    return out, methods


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("columns", nargs="+", metavar="NAME=FILE[,FILE...]")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to draw, in this order (default: all in the files)")
    args = parser.parse_args(argv)
    data, methods = summaries(args.columns)
    path = plots.families_vs_steps(data, args.methods or methods, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
