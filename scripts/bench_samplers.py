"""Sampler overhead beyond the network: time per step with a zero-cost denoiser.

    python scripts/bench_samplers.py [--device cpu] [--steps 50] [--repeats 3] [--json out.json]

Prints a table and one JSON object per row (sampler, generator kind, shape, ms per step,
microseconds per step per sample). Runs in well under 30 s on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from ldm_smd import rng
from ldm_smd.diffusion.samplers import SAMPLERS, sample
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.jsonio import dumps, write_json

SHAPES = [(256, 2), (16, 4, 32, 32), (16, 3, 64, 64)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    *, device: str = "cpu", steps: int = 50, repeats: int = 3, shapes=None
) -> list[dict[str, object]]:
    """Rows of per-step sampler overhead (the denoiser returns a preallocated tensor)."""
    dev = torch.device(device)
    schedule = NoiseSchedule(kind="linear", num_timesteps=1000)
    rows: list[dict[str, object]] = []
    for shape in shapes or SHAPES:
        out = torch.zeros(shape, device=dev)

        def denoiser(x, t, generator, out=out):
            return out

        for sampler in SAMPLERS:
            for gen_kind in ("single", "per_row"):
                best = float("inf")
                for _ in range(repeats):
                    if gen_kind == "single":
                        gen = torch.Generator(device=dev).manual_seed(0)
                    else:
                        gen = rng.row_generators(0, 0, shape[0])
                    _sync(dev)
                    start = time.perf_counter()
                    sample(
                        denoiser,
                        shape,
                        schedule=schedule,
                        parameterization="eps",
                        sampler=sampler,
                        steps=steps,
                        generator=gen,
                        device=dev,
                        ddim_eta=0.0,
                    )
                    _sync(dev)
                    best = min(best, time.perf_counter() - start)
                ms = 1e3 * best / steps
                rows.append(
                    {
                        "sampler": sampler,
                        "generator": gen_kind,
                        "shape": list(shape),
                        "device": str(dev),
                        "steps": steps,
                        "ms_per_step": round(ms, 4),
                        "us_per_step_per_sample": round(1e3 * ms / shape[0], 3),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rows = bench(device=args.device, steps=args.steps, repeats=args.repeats)
    print(f"{'sampler':8} {'generator':9} {'shape':18} {'ms/step':>9} {'us/step/sample':>15}")
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        print(
            f"{r['sampler']:8} {r['generator']:9} {shape:18} {r['ms_per_step']:9.3f} "
            f"{r['us_per_step_per_sample']:15.3f}"
        )
    for r in rows:
        print(dumps(r))
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
