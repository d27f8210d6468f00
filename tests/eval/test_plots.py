"""The benchmarks' pictures: scatter panels in both layouts, metric panels, image grids."""

from pathlib import Path

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


def test_rows_with_equal_values_at_one_T_stand_side_by_side(tmp_path):
    """The issue's case: with one T the rows' dots were drawn at one x, hidden under each
    other. Each row now has its own offset within a T, and the picture is written."""
    import matplotlib.pyplot as plt

    from ldm_smd.eval.plots import _panel, metrics_vs_steps

    rows = ["vanilla", "smd", "real_data"]
    summary = {m: {"2": {"fd": [1.0, 0.1]}} for m in rows}
    fig, ax = plt.subplots()
    _panel(ax, summary, rows, [2], "fd")
    xs = [float(bars.lines[0].get_xdata()[0]) for bars in ax.containers]
    plt.close(fig)
    assert len(xs) == 3 and len(set(xs)) == 3 and max(xs) - min(xs) < 1.0
    path = Path(metrics_vs_steps(summary, rows, [2], tmp_path / "one_T.png", metrics=["fd"]))
    assert Image.open(path).width > 300


def test_image_grid_is_readable_and_keeps_the_pixels(tmp_path):
    from ldm_smd.eval.plots import image_grid

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(100, 32, 32, 1), dtype=np.uint8)
    picture = np.asarray(Image.open(image_grid(images, tmp_path / "g.png")))
    assert picture.shape[1] >= 400 and picture.ndim == 2  # one channel stays gray
    scale = picture.shape[1] // (10 * 34 + 2)
    assert scale == 2
    # tile (row 3, column 7), upscaled by whole pixels: every block is one source pixel
    y, x = (2 + 3 * 34) * scale, (2 + 7 * 34) * scale
    tile = picture[y:y + 32 * scale:scale, x:x + 32 * scale:scale]
    assert np.array_equal(tile, images[37, ..., 0])
