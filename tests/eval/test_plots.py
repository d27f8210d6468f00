"""The benchmark's scatter plot: panels per method and T, in both layouts."""

import numpy as np
from PIL import Image

from ldm_smd.data.mixtures import ring_mixture
from ldm_smd.eval.plots import sample_scatter


def test_scatter_layouts_put_methods_in_rows_or_side_by_side(tmp_path):
    mixture = ring_mixture(num_components=4, radius=2.0, std=0.1)
    rng = np.random.default_rng(0)
    methods, T_list = ["vanilla", "smd", "exact"], [2]
    samples = {(m, 2): rng.normal(size=(100, 2)) for m in methods}
    rows = Image.open(sample_scatter(samples, mixture, methods, T_list, tmp_path / "a.png"))
    side = Image.open(sample_scatter(samples, mixture, methods, T_list, tmp_path / "b.png",
                                     transpose=True, titles={"smd": "SMD (ours)"}))
    assert rows.height > 2 * rows.width  # three methods stacked
    assert side.width > 2 * side.height  # three methods side by side
    assert side.size == rows.size[::-1]


def _summary(removed):
    return {"vanilla": {"2": {"sw": [0.4, 0.0], "sw_removed": [0.0, 0.0]}},
            "smd": {"2": {"sw": [0.1, 0.01], "sw_removed": [removed, 0.05]},
                    "5": {"sw": [0.05, 0.01], "sw_removed": [removed / 2, 0.05]}}}


def test_families_side_by_side_one_column_each(tmp_path):
    from ldm_smd.eval.plots import families_vs_steps

    one = Image.open(families_vs_steps({"a": _summary(0.8)}, ["vanilla", "smd"],
                                       tmp_path / "one.png"))
    three = Image.open(families_vs_steps({k: _summary(0.5) for k in "abc"}, ["vanilla", "smd"],
                                         tmp_path / "three.png"))
    assert three.height == one.height and three.width > 2.5 * one.width
