"""Tables of any benchmark: the gap closed on the leading metric, paired by seed; the layout a
scorer gives (leading metric first, better side); a table rebuilt from the run log."""

import json
import math

import pytest

from ldm_smd.eval.bench_report import (
    DESCRIPTION_FILE,
    Layout,
    aggregate,
    format_table,
    gap_closed,
    tabulate_results,
)

IMAGES = Layout(metrics=("fd", "confident"), better={"fd": "lower", "confident": "higher"},
                ideal="real_data")


def test_gap_closed_either_side():
    assert gap_closed(10.0, 4.0, 2.0) == pytest.approx(0.75)
    assert gap_closed(0.2, 0.8, 1.0, "higher") == pytest.approx(0.75)
    assert gap_closed(10.0, 12.0, 2.0) == pytest.approx(-0.25)  # worse than the baseline
    assert math.isnan(gap_closed(2.0, 1.0, 3.0))  # the baseline already beats the ideal
    assert math.isnan(gap_closed(10.0, float("nan"), 2.0))


def _runs():
    runs = []
    for seed, (van, smd) in enumerate([(10.0, 6.0), (12.0, 4.0)]):
        for method, fd, train_s in (("vanilla", van, 30.0), ("smd", smd, 40.0),
                                    ("real_data", 2.0, 0.0)):
            runs.append({"method": method, "T": 2, "seed": seed, "fd": fd, "confident": 0.5,
                         "nonfinite": 0.0, "train_s": train_s, "sample_s": 1.0,
                         "ms_per_step": float("nan") if train_s == 0 else 50.0,
                         "steps": 0 if train_s == 0 else 600})
    return runs


def test_the_table_leads_with_the_first_metric_and_its_gap_paired_by_seed():
    rows = ["vanilla", "smd", "real_data"]
    summary = aggregate(_runs(), rows, [2], IMAGES)
    # seed 0 closes (10 - 6) / (10 - 2) = 50% of the gap, seed 1 (12 - 4) / (12 - 2) = 80%
    assert summary["smd"]["2"]["fd_removed"][0] == pytest.approx(0.65)
    table = format_table(summary, rows, [2], IMAGES)
    head, _, vanilla, smd, real = table.splitlines()
    assert head.startswith("| T | method | fd ↓ | fd removed | confident ↑ | non-finite runs |")
    assert head.endswith("| train s | ms/step | steps |")
    assert smd.startswith("| 2 | smd | 5.000 ± 1.414 | 65 ± 21 % | 0.500 ± 0.000 |")
    assert smd.endswith("| 40 | 50 | 600 |")
    assert vanilla.startswith("| 2 | vanilla | 11.00 ± 1.41 | — |")
    assert real.endswith("| — | — | — |")  # no training


def test_a_method_run_without_the_baseline_shows_no_gap():
    runs = [r for r in _runs() if r["method"] != "vanilla"]
    rows = ["smd", "real_data"]
    (smd, _) = format_table(aggregate(runs, rows, [2], IMAGES), rows, [2], IMAGES).splitlines()[2:]
    assert smd.startswith("| 2 | smd | 5.000 ± 1.414 | — | 0.500 ± 0.000 |")


def test_a_stopped_benchmark_tabulates_from_its_log(tmp_path):
    runs = _runs()
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    with pytest.raises(ValueError, match="no layout"):
        tabulate_results(tmp_path / "runs.jsonl")
    (tmp_path / DESCRIPTION_FILE).write_text(json.dumps({"layout": IMAGES.to_json()}))
    rows = ["vanilla", "smd", "real_data"]
    expected = format_table(aggregate(_runs(), rows, [2], IMAGES), rows, [2], IMAGES)
    assert tabulate_results(tmp_path / "runs.jsonl") == expected
