"""Prepare an LSUN LMDB database: write its key index once, or export it to a folder and a list.

    python scripts/prepare_lsun.py index data/lsun/church_outdoor_train_lmdb
    python scripts/prepare_lsun.py export data/lsun/church_outdoor_train_lmdb \
        --out-dir data/lsun/churches --list data/lsun/church_outdoor_train.txt

``index`` writes ``keys.txt`` inside the LMDB folder (or ``--out FILE``), which
:class:`ldm_smd.data.lsun.LSUNLMDB` reads instead of scanning millions of keys at start-up.
``export`` writes each value's bytes unchanged (WebP / JPEG as stored, named by key) into
``--out-dir`` and the CompVis list of their relative paths into ``--list``; values that PIL
cannot decode are reported and left out. Exit status 1 when any value was left out.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldm_smd.data.lsun import (
    LMDBError,
    default_index_path,
    open_lmdb,
    read_index,
    scan_keys,
    write_index,
)
from ldm_smd.fileio import atomic_write

EXTENSIONS = {"WEBP": ".webp", "JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}


def index(path: str, out: str | None) -> Path:
    env = open_lmdb(path)
    try:
        keys = scan_keys(env)
    finally:
        env.close()
    target = Path(out) if out else default_index_path(path)
    write_index(keys, target)
    print(f"wrote {len(keys)} keys of {path} to {target}")
    return target


def _file_name(key: bytes) -> str:
    text = key.decode("ascii", errors="replace")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return safe if safe == text else f"{safe}_{key.hex()[:8]}"


def export(path: str, out_dir: str, list_file: str, limit: int | None) -> int:
    env = open_lmdb(path)
    idx = default_index_path(path)
    keys = read_index(idx) if idx.is_file() else scan_keys(env)
    if limit is not None:
        keys = keys[:limit]
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    bad: list[str] = []
    with env.begin(write=False) as txn:
        for key in tqdm(keys, desc=f"export {Path(path).name}", unit="img"):
            value = txn.get(key)
            try:
                if value is None:
                    raise OSError("key missing from database")
                with Image.open(io.BytesIO(value)) as img:
                    fmt = img.format or ""
                    img.load()
            except (OSError, SyntaxError, ValueError) as exc:
                bad.append(f"{key!r}: {exc}")
                continue
            name = _file_name(key) + EXTENSIONS.get(fmt, ".img")
            (root / name).write_bytes(value)
            names.append(name)
    env.close()
    listing = Path(list_file)
    text = "".join(n + "\n" for n in names)
    atomic_write(listing, lambda handle: handle.write(text.encode()))
    print(f"exported {len(names)} images of {path} to {root}; list: {listing}")
    if bad:
        print(f"left out {len(bad)} undecodable value(s); first: {bad[0]}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_index = sub.add_parser("index", help="write the key index of an LMDB")
    p_index.add_argument("lmdb", help="LMDB folder (with data.mdb) or file")
    p_index.add_argument("--out", default=None, help="index file (default: keys.txt inside it)")
    p_export = sub.add_parser("export", help="export an LMDB to an image folder and a list")
    p_export.add_argument("lmdb", help="LMDB folder (with data.mdb) or file")
    p_export.add_argument("--out-dir", required=True, help="folder for the images")
    p_export.add_argument("--list", required=True, help="CompVis list file to write")
    p_export.add_argument("--limit", type=int, default=None, help="export the first N only")
    args = parser.parse_args(argv)
    try:
        if args.command == "index":
            index(args.lmdb, args.out)
            return 0
        return export(args.lmdb, args.out_dir, args.list, args.limit)
    except (LMDBError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
