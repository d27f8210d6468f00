"""Image files: quantisation, grids and single PNGs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ldm_smd.images import make_grid, readable_scale, save_grid, save_singles, to_uint8


def test_uint8_quantisation_and_grid(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert to_uint8(x)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    grid = make_grid(torch.zeros(5, 3, 4, 4), nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    path = save_grid(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=2, min_tile=1)
    assert Image.open(path).size == (2 * 10 + 2, 2 * 10 + 2)


def test_small_tiles_are_enlarged_to_a_readable_size_pixel_for_pixel(tmp_path):
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    with Image.open(save_grid(images, tmp_path / "g.png", nrow=2)) as picture:
        grid = np.asarray(picture)
    assert readable_scale(8, 8) == 12 and readable_scale(256, 256) == 1
    assert grid.shape == (2 * (96 + 2) + 2, 2 * (96 + 2) + 2, 3)  # 96-pixel tiles
    tile = grid[2:98, 100:196]  # the second image: every pixel a 12 x 12 block
    assert np.array_equal(tile, to_uint8(images)[1].repeat(12, axis=0).repeat(12, axis=1))


def test_singles(tmp_path):
    singles = save_singles(torch.zeros(2, 3, 8, 8), tmp_path / "s", start=10)
    assert [p.name for p in singles] == ["000010.png", "000011.png"]
    assert np.asarray(Image.open(singles[0]))[0, 0].tolist() == [128, 128, 128]


def test_one_channel_images_are_8_bit_grayscale_pngs(tmp_path):
    x = torch.linspace(-1, 1, 3 * 8 * 8).view(3, 1, 8, 8)
    grid = save_grid(x, tmp_path / "g.png", nrow=2)
    with Image.open(grid) as image:
        assert image.mode == "L" and image.size == (2 * 10 + 2, 2 * 10 + 2)
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels[2:10, 2:10], to_uint8(x)[0, :, :, 0])
    singles = save_singles(x, tmp_path / "s")
    with Image.open(singles[2]) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), to_uint8(x)[2, :, :, 0])
