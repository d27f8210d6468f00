"""Image folders, lists and CelebA-HQ on real PNG / JPEG / WebP files; conversions; bad inputs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_smd.data.decode import CorruptImageError, decode_image, to_tensor
from ldm_smd.data.images import CelebAHQ, ImageFolder


def _marked(w=60, h=40):
    """A non-square RGB image: red bands outside the centre square, a gradient inside."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:] = (255, 0, 0)
    left = (w - h) // 2
    ys, xs = np.mgrid[0:h, 0:h]
    arr[:, left : left + h, 0] = 0
    arr[:, left : left + h, 1] = (xs * 255 // (h - 1)).astype(np.uint8)
    arr[:, left : left + h, 2] = (ys * 255 // (h - 1)).astype(np.uint8)
    return arr


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    arr = _marked()
    Image.fromarray(arr).save(root / "a.png")
    Image.fromarray(arr).save(root / "sub" / "b.jpg", quality=95)
    Image.fromarray(arr).save(root / "sub" / "deeper" / "c.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")
    return root


def test_reads_png_jpeg_webp_recursively(folder):
    ds = ImageFolder(root=str(folder), size=16, return_path=True)
    assert len(ds) == 3
    assert [p.rsplit("/", 1)[-1] for p in ds.paths] == ["a.png", "b.jpg", "c.webp"]
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["path"] == ds.paths[i]
        assert item["image"][0].mean() < -0.9  # the red bands were cropped away


def test_centre_crop_geometry_is_exact_on_lossless_files(folder):
    arr = _marked()
    expected = to_tensor(Image.fromarray(arr[:, 10:50]))
    ds = ImageFolder(root=str(folder), size=None)
    assert torch.equal(ds[0]["image"], expected)  # PNG
    assert torch.equal(ds[2]["image"], expected)  # lossless WebP
    jpeg_error = (ds[1]["image"] - expected).abs()  # JPEG is lossy; red bleeds at the cut edges
    assert jpeg_error.mean() < 0.05 and jpeg_error[..., 3:-3].max() < 0.2
    # a portrait image is cropped top/bottom the same way
    Image.fromarray(arr.transpose(1, 0, 2).copy()).save(folder / "sub" / "p.png")
    ds = ImageFolder(root=str(folder), size=None)
    assert torch.equal(ds[3]["image"], expected.transpose(1, 2))


def test_random_crop_is_a_window(folder):
    arr = _marked()
    full = to_tensor(Image.fromarray(arr))
    torch.manual_seed(0)
    ds = ImageFolder(root=str(folder), size=None, crop="random")
    out = ds[0]["image"]
    windows = [full[:, :, x : x + 40] for x in range(21)]
    assert any(torch.equal(out, w) for w in windows)


def test_flip(folder):
    plain = ImageFolder(root=str(folder), size=16)[0]["image"]
    flipped = ImageFolder(root=str(folder), size=16, flip_p=1.0)[0]["image"]
    assert torch.equal(flipped, torch.flip(plain, dims=[-1]))
    ds = ImageFolder(root=str(folder), size=16, flip_p=0.5)
    for seed in range(4):
        torch.manual_seed(seed)
        expect_flip = float(torch.rand(())) < 0.5
        torch.manual_seed(seed)
        assert torch.equal(ds[0]["image"], flipped if expect_flip else plain)


def test_resize_uses_the_chosen_filter(folder):
    a = ImageFolder(root=str(folder), size=12, interpolation="bicubic")[0]["image"]
    b = ImageFolder(root=str(folder), size=12, interpolation="lanczos")[0]["image"]
    assert a.shape == b.shape == (3, 12, 12)
    assert not torch.equal(a, b)


def test_conversions(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    img = np.asarray(decode_image(tmp_path / "gray.png"))
    assert img.shape == (16, 16, 3) and (img == gray[..., None]).all()

    g16 = np.full((8, 8), 65535, dtype=np.uint16)
    g16[:, :4] = 32896  # 128 * 257
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = np.asarray(decode_image(tmp_path / "g16.png"))
    assert img[0, 0].tolist() == [128] * 3 and img[0, 7].tolist() == [255] * 3

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under everything
    rgba[:, 2:, 3] = 255  # right half opaque, left half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    white = np.asarray(decode_image(tmp_path / "rgba.png", alpha="white"))
    assert white[0, 0].tolist() == [255, 255, 255] and white[0, 3].tolist() == [200, 0, 0]
    drop = np.asarray(decode_image(tmp_path / "rgba.png", alpha="drop"))
    assert drop[0, 0].tolist() == [200, 0, 0]

    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "pal.png")
    img = np.asarray(decode_image(tmp_path / "pal.png"))
    assert img[1, 1].tolist() == [10, 200, 30] and img[0, 0].tolist() == [0, 0, 0]

    Image.new("LA", (4, 4), (100, 0)).save(tmp_path / "la.png")
    assert np.asarray(decode_image(tmp_path / "la.png"))[0, 0].tolist() == [255] * 3


def test_file_list_order_and_subset(folder, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nsub/deeper/c.webp\n\na.png\n")
    ds = ImageFolder(root=str(folder), file_list=str(lst), size=8)
    assert [p.rsplit("/", 1)[-1] for p in ds.paths] == ["c.webp", "a.png"]


def test_list_naming_missing_files_names_the_first(folder, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\nmissing1.png\nsub/missing2.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"2 file\(s\) missing.*missing1\.png"):
        ImageFolder(root=str(folder), file_list=str(lst))
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        ImageFolder(root=str(folder), file_list=str(tmp_path / "nolist.txt"))
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="empty.txt names no files"):
        ImageFolder(root=str(folder), file_list=str(tmp_path / "empty.txt"))


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} holds no images"):
        ImageFolder(root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(root=str(tmp_path / "nowhere"))


@pytest.fixture
def with_bad(folder):
    good = (folder / "sub" / "b.jpg").read_bytes()
    (folder / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "b_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return folder


def test_corrupt_and_truncated_images_are_errors_naming_the_file(with_bad):
    ds = ImageFolder(root=str(with_bad), size=8)
    names = [p.rsplit("/", 1)[-1] for p in ds.paths]
    with pytest.raises(CorruptImageError, match="b_garbage.png"):
        ds[names.index("b_garbage.png")]
    with pytest.raises(CorruptImageError, match="b_truncated.jpg"):
        ds[names.index("b_truncated.jpg")]


def test_skip_corrupt_warns_counts_and_substitutes(with_bad):
    ds = ImageFolder(root=str(with_bad), size=8, skip_corrupt=True, return_path=True)
    names = [p.rsplit("/", 1)[-1] for p in ds.paths]
    assert names == ["a.png", "b_garbage.png", "b_truncated.jpg", "b.jpg", "c.webp"]
    with pytest.warns(UserWarning) as record:
        item = ds[1]
    assert item["path"].endswith("b.jpg") and ds.num_skipped == 2
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "b_garbage.png" in messages[0] and "1 skipped" in messages[0]
    assert "b_truncated.jpg" in messages[1] and "2 skipped" in messages[1]


def test_celebahq_split_with_stem_matching(tmp_path):
    root = tmp_path / "celebahq"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / f"imgHQ{i:05d}.png")
    split = tmp_path / "celebahqtrain.txt"
    split.write_text("imgHQ00002.npy\nimgHQ00000.npy\n")
    ds = CelebAHQ(root=str(root), split_file=str(split), size=8)
    assert len(ds) == 2
    assert ds[0]["image"].shape == (3, 8, 8)
    assert torch.allclose(ds[0]["image"], torch.full((3, 8, 8), 80 / 127.5 - 1))
    split.write_text("imgHQ00000.png\nimgHQ00007.png\n")
    with pytest.raises(FileNotFoundError, match="imgHQ00007"):
        CelebAHQ(root=str(root), split_file=str(split))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"crop": "middle"}, "crop='middle'"), ({"interpolation": "cubic"}, "interpolation"),
     ({"alpha": "grey"}, "alpha='grey'"), ({"flip_p": 2.0}, "flip_p=2.0"), ({"size": 0}, "size=0")],
)
def test_bad_parameters(folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageFolder(root=str(folder), **kwargs)


def test_prepare_celebahq_reports_missing_files(tmp_path, capsys):
    script = Path(__file__).resolve().parents[2] / "scripts" / "prepare_celebahq.py"
    spec = importlib.util.spec_from_file_location("prepare_celebahq", script)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    root = tmp_path / "celebahq"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"imgHQ{i:05d}.png")
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("imgHQ00000.npy\nimgHQ00001.npy\n")
    val.write_text("imgHQ00001.png\nimgHQ00005.png\n")
    assert prepare.main([str(root), "--split", str(train), "--verify"]) == 0
    assert prepare.main([str(root), "--split", str(train), "--split", str(val)]) == 1
    out = capsys.readouterr().out
    assert "2 listed, 1 found, 1 missing" in out and "imgHQ00005.png" in out
    (root / "imgHQ00001.png").write_bytes(b"broken")
    assert prepare.main([str(root), "--split", str(train), "--verify"]) == 1
    assert "undecodable" in capsys.readouterr().out
    assert prepare.main([str(tmp_path / "nowhere"), "--split", str(train)]) == 2


def test_channels_1_reads_grayscale(tmp_path):
    root = tmp_path / "gray"
    root.mkdir()
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(values, mode="L").save(root / "a.png")
    Image.fromarray(np.stack([values, 255 - values, values // 2], axis=-1)).save(root / "b.png")
    ds = ImageFolder(root=str(root), size=None, channels=1)
    gray, colour = ds[0]["image"], ds[1]["image"]
    assert gray.shape == colour.shape == (1, 16, 16)
    torch.testing.assert_close(gray[0], torch.from_numpy(values).float() / 127.5 - 1)  # exact
    rgb = ImageFolder(root=str(root), size=None)[1]["image"]  # the default stays RGB
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] + 1) * 127.5
    assert (colour[0].add(1).mul(127.5) - luma).abs().max() <= 1.0
    with pytest.raises(ValueError, match="channels=2"):
        ImageFolder(root=str(root), channels=2)
