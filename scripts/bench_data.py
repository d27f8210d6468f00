"""Data-loading throughput: decoding 256x256 JPEGs on 2 cores, and the built-in dataset.

    python scripts/bench_data.py [--images 256] [--seconds 6] [--workers 2]

Writes ``--images`` JPEGs (256 x 256, quality 90: built-in shapes rendered at 128, upscaled) into a
temporary folder, then reads them through :class:`ldm_smd.data.images.ImageFolder` (PIL decode,
RGB conversion, tensor in [-1, 1]) and prints images per second for: one process; a DataLoader
with ``--workers`` worker processes (one torch thread each); and the same with a resize to 128.
Also prints the built-in :class:`SyntheticShapes` rendering rate at 32 and 64 pixels.
The whole run takes well under a minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm_smd.data.images import ImageFolder
from ldm_smd.data.synthetic import SyntheticShapes


def _write_jpegs(folder: Path, n: int, size: int = 256) -> None:
    shapes = SyntheticShapes(size=size // 2, length=n, seed=123)  # rendered at 128, upscaled
    for start in range(0, n, 32):
        images, _ = shapes.render(range(start, min(n, start + 32)))
        arr = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for i, a in enumerate(arr):
            img = Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.BICUBIC)
            img.save(folder / f"{start + i:05d}.jpg", quality=90)


def _rate(fn, seconds: float) -> float:
    """Items per second of ``fn()`` (which returns how many items it made), over ``seconds``."""
    fn()  # warm-up (worker start-up, caches)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += fn()
    return done / (time.perf_counter() - start)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs to generate")
    parser.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        _write_jpegs(folder, args.images)
        mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"wrote {args.images} JPEGs 256x256 q90 ({mb:.1f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s")

        ds = ImageFolder(root=tmp, size=256)
        cursor = iter(range(10**9))

        def one_process() -> int:
            for _ in range(16):
                ds[next(cursor) % len(ds)]
            return 16

        rate1 = _rate(one_process, args.seconds / 2)
        print(f"decode 256x256 JPEG -> tensor, 1 process:        {rate1:8.0f} images/s")

        for size in (256, 128):
            data = ImageFolder(root=tmp, size=size)
            loader = DataLoader(data, batch_size=32, shuffle=False, num_workers=args.workers,
                                persistent_workers=True, worker_init_fn=_init_worker)

            def epoch(loader: DataLoader = loader) -> int:
                return sum(batch["image"].shape[0] for batch in loader)

            rate = _rate(epoch, args.seconds)
            label = "decode" if size == 256 else "decode + resize to 128"
            print(f"{label}, DataLoader {args.workers} workers:".ljust(50)
                  + f"{rate:8.0f} images/s")
            del loader

    for size in (32, 64):
        shapes = SyntheticShapes(size=size, length=10**6)
        offset = iter(range(0, 10**6, 256))

        def render(shapes: SyntheticShapes = shapes, offset=offset) -> int:
            start = next(offset)
            shapes.render(range(start, start + 256))
            return 256

        rate = _rate(render, args.seconds / 4)
        print(f"SyntheticShapes {size}x{size}, batched, 1 thread:".ljust(50)
              + f"{rate:8.0f} images/s")


if __name__ == "__main__":
    main()
