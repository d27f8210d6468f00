"""LSUN, from the LMDB databases as distributed or from an image folder with a CompVis list.

LSUN's scene categories come as one LMDB each (``church_outdoor_train_lmdb/`` holding
``data.mdb`` and ``lock.mdb``): one key per image, the value the encoded image (WebP/JPEG).
:class:`LSUNLMDB` reads such a database read-only (``lock=False, readahead=False``) through one
environment per process (:func:`shared_env`: each DataLoader worker opens its own, lazily; a
copy inherited through ``fork`` is closed, never used). Its list of keys comes from a key-index
file written once by ``scripts/prepare_lsun.py index`` (fast start), or else from a scan.

:class:`LSUNFolder` is CompVis' layout: images exported to a folder (``data/lsun/churches``) and
a list of relative paths (``data/lsun/church_outdoor_train.txt`` / ``..._val.txt``).

Preprocessing is CompVis' for both: the centred square of side ``min(h, w)``, resized to ``size``
with PIL bicubic (``interpolation`` can select lanczos), a random left-right flip with probability
``flip_p`` (CompVis: 0.5 for training, 0 for validation), values ``v / 127.5 - 1``.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # Python 3.10
    from typing_extensions import Unpack

import lmdb
import numpy as np

from ldm_smd.checkpoints import atomic_write
from ldm_smd.data.images import EncodedImageDataset, ImageFolder, ImageOptions

INDEX_HEADER = "# ldm-smd lsun key index v1"
_SCAN_WARN = 200_000


class LMDBError(ValueError):
    """A missing, truncated or unreadable LMDB database; the message names it."""


def default_index_path(path: str | os.PathLike[str]) -> Path:
    """Where the key index of LMDB ``path`` lives by default: ``keys.txt`` inside its folder."""
    p = Path(path)
    return p / "keys.txt" if p.is_dir() else p.with_name(p.name + ".keys.txt")


def _data_file(p: Path) -> Path:
    return p / "data.mdb" if p.is_dir() else p


def check_not_truncated(env: lmdb.Environment, path: str | os.PathLike[str]) -> None:
    """A truncated data file opens, but reading past its end would kill the process (SIGBUS)."""
    data_file = _data_file(Path(path))
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    actual = data_file.stat().st_size
    if actual < needed:
        raise LMDBError(
            f"LMDB database {path} is truncated: {data_file} has {actual} bytes, its pages need "
            f"{needed}"
        )


def open_lmdb(path: str | os.PathLike[str]) -> lmdb.Environment:
    """Open an LMDB read-only (a new environment), checking that it exists and is not truncated.

    py-lmdb allows one environment per database and process: datasets use :func:`shared_env`.
    """
    p = Path(path)
    if not p.exists():
        raise LMDBError(f"LMDB database not found: {p}")
    if not _data_file(p).is_file():
        raise LMDBError(f"LMDB database {p} has no data file {_data_file(p)}")
    try:
        env = lmdb.open(str(p), subdir=p.is_dir(), readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=512)
    except lmdb.Error as exc:
        raise LMDBError(f"cannot open LMDB database {p}: {exc}") from exc
    try:
        check_not_truncated(env, p)
    except LMDBError:
        env.close()
        raise
    return env


# one read-only environment per database and process; an entry inherited through fork (a
# DataLoader worker) belongs to the parent: the child closes its copy and opens its own. An entry
# whose data file changed (replaced or truncated) is reopened before its old mapping is touched.
_ENVS: dict[str, tuple[int, tuple[int, int, int], lmdb.Environment]] = {}


def _file_signature(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    st = _data_file(Path(path)).stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def shared_env(path: str | os.PathLike[str]) -> lmdb.Environment:
    """This process's read-only environment of LMDB ``path`` (opened on first use)."""
    key = os.path.realpath(path)
    entry = _ENVS.pop(key, None)
    if entry is not None:
        owner, signature, env = entry
        try:
            same_file = signature == _file_signature(path)
        except OSError:
            same_file = False
        if owner == os.getpid() and same_file:
            _ENVS[key] = entry
            return env
        env.close()  # stale, or the fork-inherited copy (the parent's is untouched)
    env = open_lmdb(path)
    _ENVS[key] = (os.getpid(), _file_signature(path), env)
    return env


def release_env(path: str | os.PathLike[str] | None = None) -> None:
    """Close this process's environment of ``path`` (all of them when ``None``)."""
    keys = list(_ENVS) if path is None else [os.path.realpath(path)]
    for key in keys:
        entry = _ENVS.pop(key, None)
        if entry is not None and entry[0] == os.getpid():
            entry[2].close()


def scan_keys(env: lmdb.Environment) -> list[bytes]:
    """Every key of an open LMDB, in database order."""
    with env.begin(write=False) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def write_index(keys: list[bytes], index_file: str | os.PathLike[str]) -> None:
    """Write a key index: a header with the count, then one hex-encoded key per line."""
    text = f"{INDEX_HEADER} entries={len(keys)}\n" + "".join(k.hex() + "\n" for k in keys)
    atomic_write(index_file, lambda handle: handle.write(text.encode()))


def read_index(index_file: str | os.PathLike[str]) -> list[bytes]:
    """Read a key index written by :func:`write_index`; errors name the file."""
    path = Path(index_file)
    with open(path) as f:
        header = f.readline().strip()
        if not header.startswith(INDEX_HEADER):
            raise LMDBError(f"{path} is not an LSUN key index (first line {header!r})")
        try:
            keys = [bytes.fromhex(line.strip()) for line in f if line.strip()]
        except ValueError as exc:
            raise LMDBError(f"key index {path} has a line that is not a hex key: {exc}") from exc
    expected = int(header.rsplit("entries=", 1)[-1]) if "entries=" in header else len(keys)
    if len(keys) != expected:
        raise LMDBError(f"key index {path} is truncated: {len(keys)} keys, header says {expected}")
    return keys


class LSUNLMDB(EncodedImageDataset):
    """An LSUN category read from its LMDB database (keys -> encoded images).

    Args:
        path: the LMDB folder (with ``data.mdb``) or file.
        index_file: key index written by ``scripts/prepare_lsun.py index``; ``None`` uses
            ``keys.txt`` inside the LMDB folder when present, else scans the database.
        options: the decoding options (:class:`~ldm_smd.data.images.ImageOptions`; CompVis:
            center crop, bicubic, ``flip_p`` 0.5 for training); ``return_path`` adds
            ``"path"`` = ``"<lmdb path>:<key>"``.
    """

    def __init__(self, *, path: str, index_file: str | None = None,
                 **options: Unpack[ImageOptions]) -> None:
        super().__init__(**options)
        self.path = str(path)
        env = shared_env(self.path)
        entries = env.stat()["entries"]
        if index_file is None and default_index_path(self.path).is_file():
            index_file = str(default_index_path(self.path))
        if index_file is not None:
            if not Path(index_file).is_file():
                raise FileNotFoundError(f"LSUN key index not found: {index_file}")
            keys = read_index(index_file)
            if len(keys) != entries:
                raise LMDBError(
                    f"key index {index_file} lists {len(keys)} keys but LMDB {self.path} "
                    f"has {entries}; rebuild it with: python scripts/prepare_lsun.py index "
                    f"{self.path}"
                )
        else:
            if entries > _SCAN_WARN:
                warnings.warn(
                    f"scanning {entries} keys of {self.path}; write a key index once with "
                    f"`python scripts/prepare_lsun.py index {shlex.quote(str(self.path))}` for a "
                    "fast start",
                    stacklevel=2,
                )
            keys = scan_keys(env)
        if not keys:
            raise LMDBError(f"LMDB database {self.path} holds no images")
        self.index_file = index_file
        # a fixed-width bytes array: compact, and cheap to send to worker processes
        width = max(len(k) for k in keys)
        nul_tail = any(k.endswith(b"\0") for k in keys)  # numpy "S" would strip those
        self._keys: np.ndarray | list[bytes] = keys if nul_tail else np.array(keys, f"S{width}")

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> bytes:
        """The LMDB key of item ``index``."""
        return bytes(self._keys[index])

    def _txn_get(self, key: bytes) -> bytes | None:
        with shared_env(self.path).begin(write=False) as txn:
            return txn.get(key)

    def _source(self, index: int) -> tuple[bytes, str]:
        key = self.key(index)
        name = f"{self.path}:{key.decode('ascii', errors='backslashreplace')}"
        try:
            value = self._txn_get(key)
        except lmdb.Error as exc:
            raise LMDBError(f"reading {name} failed: {exc}") from exc
        if value is None:
            raise LMDBError(f"key {name} is missing from the database (stale key index?)")
        return value, name


class LSUNFolder(ImageFolder):
    """An LSUN category exported to an image folder, with a CompVis file list.

    CompVis' layout: ``data/lsun/churches`` with ``data/lsun/church_outdoor_train.txt`` and
    ``data/lsun/church_outdoor_val.txt`` (see ``data/lsun/README.md``); ``scripts/prepare_lsun.py
    export`` writes such a folder and list from an LMDB.

    Args:
        root: the image folder.
        file_list: the CompVis list of paths relative to ``root``.
        options: the decoding options (:class:`~ldm_smd.data.images.ImageOptions`; CompVis:
            center crop, bicubic, ``flip_p`` 0.5 for training).
    """

    def __init__(self, *, root: str, file_list: str, **options: Unpack[ImageOptions]) -> None:
        super().__init__(root=root, file_list=file_list, **options)
