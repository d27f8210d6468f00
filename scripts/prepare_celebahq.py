"""Check a CelebA-HQ image folder against its split lists and report what is missing.

    python scripts/prepare_celebahq.py data/celebahq \
        --split data/celebahq/celebahqtrain.txt --split data/celebahq/celebahqvalidation.txt

Each list names one image per line relative to the folder; as in
:class:`ldm_smd.data.images.CelebAHQ`, an entry is also found by its stem with any image extension
(``imgHQ00000.npy`` finds ``imgHQ00000.png``). ``--verify`` also decodes every image found.
Prints a summary per list and the first missing (or undecodable) files; exit status 1 when
anything is missing or undecodable, 2 when a list or the folder itself is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_smd.data.decode import CorruptImageError, decode_image
from ldm_smd.data.images import find_listed, read_file_list

DEFAULT_SPLITS = ("data/celebahq/celebahqtrain.txt", "data/celebahq/celebahqvalidation.txt")


def check(root: str, splits: list[str], *, verify: bool, show: int) -> int:
    if not Path(root).is_dir():
        print(f"error: CelebA-HQ folder not found: {root}", file=sys.stderr)
        return 2
    status = 0
    for split in splits:
        try:
            entries = read_file_list(split)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        found, missing = find_listed(root, entries, match_stem=True)
        corrupt: list[str] = []
        if verify:
            for path in found:
                try:
                    decode_image(path)
                except CorruptImageError as exc:
                    corrupt.append(str(exc))
        print(f"{split}: {len(entries)} listed, {len(found)} found, {len(missing)} missing"
              + (f", {len(corrupt)} undecodable" if verify else ""))
        for path in missing[:show]:
            print(f"  missing: {path}")
        if len(missing) > show:
            print(f"  ... and {len(missing) - show} more missing")
        for msg in corrupt[:show]:
            print(f"  undecodable: {msg}")
        if missing or corrupt:
            status = 1
    print("OK: every listed image is present" if status == 0 else "INCOMPLETE: see above")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="data/celebahq", help="the image folder")
    parser.add_argument("--split", action="append", default=None,
                        help=f"a split list (repeatable; default: {', '.join(DEFAULT_SPLITS)})")
    parser.add_argument("--verify", action="store_true", help="also decode every image")
    parser.add_argument("--show", type=int, default=10, help="missing files to print per list")
    args = parser.parse_args(argv)
    return check(args.root, args.split or list(DEFAULT_SPLITS), verify=args.verify,
                 show=args.show)


if __name__ == "__main__":
    sys.exit(main())
