"""scripts/plot_mixtures.py merges the run files of a column as the benchmark aggregates them."""

import json
import sys
from pathlib import Path

import pytest

from ldm_smd.eval.mixture_report import aggregate

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import plot_mixtures  # noqa: E402


def _runs(seed, sw_smd):
    return [{"method": "vanilla", "T": 2, "seed": seed, "sw": 0.4, "precision": 0.1},
            {"method": "smd", "T": 2, "seed": seed, "sw": sw_smd, "precision": 0.5},
            {"method": "exact_posterior", "T": 2, "seed": seed, "sw": 0.0, "precision": 0.99}]


def test_columns_merge_their_files_and_the_figure_is_written(tmp_path):
    a, b = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in _runs(0, 0.1)))
    b.write_text("".join(json.dumps(r) + "\n" for r in _runs(1, 0.2)))
    data, methods = plot_mixtures.summaries([f"ring={a},{b}"])
    assert methods == ["vanilla", "smd", "exact_posterior"]
    expected = aggregate(_runs(0, 0.1) + _runs(1, 0.2), methods, [2])
    assert data["ring"]["smd"]["2"]["sw_removed"] == pytest.approx(
        expected["smd"]["2"]["sw_removed"])
    assert data["ring"]["smd"]["2"]["sw_removed"][0] == pytest.approx(0.625)  # (0.75 + 0.5) / 2
    out = plot_mixtures.main([f"ring={a},{b}", f"one={a}", "--out", str(tmp_path / "f.png")])
    assert Path(out).is_file()
    with pytest.raises(SystemExit, match="NAME=FILE"):
        plot_mixtures.summaries([str(a)])
