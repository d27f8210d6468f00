"""Mean error and spread of trained models' x0 draws, per timestep, on held-out MNIST-5k digits.

    python scripts/draw_calibration.py --ckpt vanilla=runs/tables/pixel/runs/vanilla_T5_seed0 \
        --ckpt smd_image=runs/tables/pixel/runs/smd_image_T5_seed0 --data data/mnist5k

Each ``--ckpt NAME=PATH`` is a stage-2 checkpoint, or a run folder (its
``checkpoints/last.ckpt``). The digits are encoded by the checkpoint's own first stage (pixel
space: as they are), the weights are the ones sampling uses (the EMA where there is one), and
``ldm_smd.eval.draws.draw_calibration`` gives one row per training timestep: the RMS error of
the mean of ``--draws`` draws, of one draw, their spread, and the calibration (1 when the draws
are distributed as ``q(x0 | x_t)``). Prints one markdown table per checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _checkpoint(path: str) -> Path:
    p = Path(path)
    return p / "checkpoints" / "last.ckpt" if p.is_dir() else p


def calibrate(name: str, path: Path, args: argparse.Namespace) -> list[dict]:
    from ldm_smd.data.mnist5k import MNIST5k
    from ldm_smd.eval.draws import draw_calibration
    from ldm_smd.sample import load_diffusion_checkpoint

    model = load_diffusion_checkpoint(path).eval()
    images = MNIST5k(root=args.data, split="heldout").images[: args.n]
    generator = torch.Generator().manual_seed(args.seed)
    x0 = model.first_stage_model.encode(images)
    with model.sampling_network() as network:
        return draw_calibration(
            network, x0, schedule=model.schedule, parameterization=model.parameterization,
            generator=generator, num_draws=args.draws, clip_x0=model.clips_x0,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--data", default="data/mnist5k", help="prepared MNIST-5k folder")
    parser.add_argument("--n", type=int, default=200, help="held-out digits")
    parser.add_argument("--draws", type=int, default=8, help="draws per x_t (K >= 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for spec in args.ckpt:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--ckpt {spec!r}: expected NAME=PATH")
        ckpt = _checkpoint(path)
        print(f"\n{name} ({ckpt})\n")
        print("| t | abar | err_mean | err_draw | spread | calibration |")
        print("|---|---|---|---|---|---|")
        for r in calibrate(name, ckpt, args):
            print(f"| {r['t']} | {r['abar']:.3f} | {r['err_mean']:.4f} | {r['err_draw']:.4f} "
                  f"| {r['spread']:.4f} | {r['calibration']:.2f} |")


if __name__ == "__main__":
    main()
