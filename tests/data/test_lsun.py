"""LSUN from a real LMDB (and from a folder with a CompVis list); key index; bad databases."""

import importlib.util
import io
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm_smd.data.decode import CorruptImageError, to_tensor
from ldm_smd.data.lsun import (
    LSUNLMDB,
    LMDBError,
    LSUNFolder,
    default_index_path,
    read_index,
    release_env,
)

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(i, w=48, h=32):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = 30 * i
    arr[:, (w - h) // 2 : (w + h) // 2, 1] = np.arange(h, dtype=np.uint8)[None, :] * 7
    return arr


def _encode(arr, fmt):
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(arr).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _write_lmdb(path, values):
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in values:
            txn.put(key, value)
    env.close()
    return path


@pytest.fixture
def db(tmp_path):
    values = [(f"{i:040x}".encode(), _encode(_image(i), fmt))
              for i, fmt in enumerate(["WEBP", "PNG", "JPEG", "WEBP", "PNG"])]
    return _write_lmdb(tmp_path / "church_outdoor_train_lmdb", values)


def test_reads_every_image_with_centre_crop(db):
    ds = LSUNLMDB(path=str(db), size=None, return_path=True)
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["path"] == f"{db}:{i:040x}"
    for i in (0, 1):  # lossless WebP and PNG: exactly the centred 32 x 32 square
        assert torch.equal(ds[i]["image"], to_tensor(Image.fromarray(_image(i)[:, 8:40])))
    small = LSUNLMDB(path=str(db), size=16)
    assert small[3]["image"].shape == (3, 16, 16)


def test_flip(db):
    plain = LSUNLMDB(path=str(db), size=16)[1]["image"]
    flipped = LSUNLMDB(path=str(db), size=16, flip_p=1.0)[1]["image"]
    assert torch.equal(flipped, torch.flip(plain, dims=[-1]))


def test_key_index_round_trip_and_staleness(db, tmp_path):
    prepare = _script("prepare_lsun")
    assert prepare.main(["index", str(db)]) == 0
    index = default_index_path(db)
    assert index == db / "keys.txt" and index.is_file()
    assert read_index(index) == [f"{i:040x}".encode() for i in range(5)]
    ds = LSUNLMDB(path=str(db), size=8)
    assert ds.index_file == str(index) and len(ds) == 5
    # a stale index (the database gained an image) is an error naming the index
    release_env(db)  # py-lmdb opens a database once per process: close ours to write
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"extra", _encode(_image(7), "PNG"))
    env.close()
    with pytest.raises(LMDBError, match="keys.txt lists 5 keys but LMDB .* has 6"):
        LSUNLMDB(path=str(db))
    with pytest.raises(FileNotFoundError, match="nokeys.txt"):
        LSUNLMDB(path=str(db), index_file=str(tmp_path / "nokeys.txt"))


def test_export_to_folder_and_list(db, tmp_path):
    prepare = _script("prepare_lsun")
    out, listing = tmp_path / "churches", tmp_path / "church_outdoor_train.txt"
    assert prepare.main(["export", str(db), "--out-dir", str(out), "--list", str(listing)]) == 0
    names = listing.read_text().split()
    assert len(names) == 5 and names[0].endswith(".webp") and names[2].endswith(".jpg")
    folder = LSUNFolder(root=str(out), file_list=str(listing), size=None)
    from_db = LSUNLMDB(path=str(db), size=None)
    for i in range(5):
        assert torch.equal(folder[i]["image"], from_db[i]["image"])


def test_missing_and_truncated_databases_are_named(db, tmp_path):
    with pytest.raises(LMDBError, match="not found: .*nothere_lmdb"):
        LSUNLMDB(path=str(tmp_path / "nothere_lmdb"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LMDBError, match="empty_dir has no data file"):
        LSUNLMDB(path=str(tmp_path / "empty_dir"))
    LSUNLMDB(path=str(db))  # fine, and leaves this process's environment open
    data = db / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(LMDBError, match="church_outdoor_train_lmdb is truncated"):
        LSUNLMDB(path=str(db))
    data.write_bytes(b"")
    with pytest.raises(LMDBError, match="church_outdoor_train_lmdb"):
        LSUNLMDB(path=str(db))


def test_empty_database(tmp_path):
    path = _write_lmdb(tmp_path / "empty_lmdb", [])
    with pytest.raises(LMDBError, match="empty_lmdb holds no images"):
        LSUNLMDB(path=str(path))


def test_corrupt_value_is_named_or_skipped(tmp_path):
    good = _encode(_image(1), "PNG")
    path = _write_lmdb(tmp_path / "bad_lmdb",
                       [(b"a", good), (b"b", good[: len(good) // 3]), (b"c", b"junk")])
    ds = LSUNLMDB(path=str(path), size=8)
    with pytest.raises(CorruptImageError, match="bad_lmdb:b"):
        ds[1]
    skipping = LSUNLMDB(path=str(path), size=8, skip_corrupt=True, return_path=True)
    with pytest.warns(UserWarning, match="bad_lmdb:c"):
        assert skipping[2]["path"].endswith(":a")
    assert skipping.num_skipped == 1


def test_pickles_without_its_environment_and_works_in_a_worker(db):
    ds = LSUNLMDB(path=str(db), size=8)
    first = ds[0]["image"]  # opens the environment in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["image"], first)
    loader = DataLoader(ds, batch_size=5, num_workers=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, 8, 8)
    assert torch.equal(batch["image"][0], first)


def test_folder_with_compvis_list(tmp_path):
    root = tmp_path / "churches"
    root.mkdir()
    for i in range(3):
        Image.fromarray(_image(i)).save(root / f"{i}.png")
    listing = tmp_path / "church_outdoor_val.txt"
    listing.write_text("2.png\n0.png\n")
    ds = LSUNFolder(root=str(root), file_list=str(listing), size=16)
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 16, 16)
    listing.write_text("2.png\n7.png\n")
    with pytest.raises(FileNotFoundError, match="7.png"):
        LSUNFolder(root=str(root), file_list=str(listing))
