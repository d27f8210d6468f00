"""The ``ldm-smd`` command line: argument parsing only, then calls into the package.

    ldm-smd train --config FILE [key.path=value ...] [--resume RUN_DIR_OR_CKPT]
    ldm-smd sample --ckpt PATH [--sampler ddpm|ddim|dpmpp] [--steps N] [--n N] [--seed S] --out DIR
    ldm-smd scale-factor --ckpt STAGE1 --config DATA.yaml [--batches N] [--write STAGE2.yaml]
    ldm-smd eval --samples DIR --ref DIR_OR_NPZ [--out FILE.json]
    ldm-smd bench-mixture --config configs/mixture/NAME.yaml [key.path=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> None:
    from ldm_smd.train import train

    if args.config is None and args.resume is None:
        raise SystemExit("ldm-smd train: give --config FILE (or --resume RUN_DIR)")
    result = train(args.config, args.overrides, resume=args.resume)
    print(f"[ldm-smd] run folder: {result['run_dir']}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from ldm_smd.sample import sample_to_dir

    result = sample_to_dir(
        args.ckpt, args.out, n=args.n, steps=args.steps, sampler=args.sampler,
        spacing=args.spacing, ddim_eta=args.ddim_eta, seed=args.seed, batch_size=args.batch_size,
        use_ema=not args.no_ema, device=args.device, progress=not args.no_progress,
    )
    print(f"[ldm-smd] {args.n} samples in {result['seconds']:.1f} s")
    print(f"[ldm-smd] grid: {result['grid']}")
    print(f"[ldm-smd] images: {result['images']}  arrays: {result['npz']}")


def _cmd_scale_factor(args: argparse.Namespace) -> None:
    from ldm_smd.latent_scale import scale_factor_command

    value = scale_factor_command(args.ckpt, args.config, batches=args.batches, write=args.write)
    print(f"{value:.6g}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ldm_smd.eval.evaluate import evaluate, format_result

    metrics = evaluate(
        args.samples, args.ref, out_json=args.out, batch_size=args.batch_size,
        device=args.device, weights_path=args.inception_weights, min_samples=args.min_samples,
    )
    print(format_result(metrics))


def _cmd_bench_mixture(args: argparse.Namespace) -> None:
    from ldm_smd.bench.runner import run_mixture_benchmark

    out = args.out or Path("runs") / "mixture" / Path(args.config).stem
    result = run_mixture_benchmark(
        args.config, out_dir=out, overrides=args.overrides, quick=args.quick, seeds=args.seeds,
        T_list=args.T, workers=args.workers, methods=args.methods,
    )
    print(result.get("table", ""))
    print(f"[ldm-smd] mixture benchmark written to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-smd", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train stage 1 or stage 2 from a config")
    p.add_argument("--config", help="YAML config (target/params blocks)")
    p.add_argument("--resume", help="run folder or checkpoint to resume exactly")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="sample from a stage-2 checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: all)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=None)
    p.add_argument("--spacing", choices=["uniform", "trailing", "quadratic"], default=None)
    p.add_argument("--ddim-eta", type=float, default=None, help="DDIM stochasticity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("scale-factor", help="estimate 1/std of a first stage's latents")
    p.add_argument("--ckpt", required=True, help="first stage: checkpoint or diffusers folder")
    p.add_argument("--config", required=True, help="a config whose data block gives images")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--write", default=None, help="stage-2 config to write the value into")
    p.set_defaults(func=_cmd_scale_factor)

    p = sub.add_parser("eval", help="FID / KID / precision-recall of a sample folder")
    p.add_argument("--samples", required=True)
    p.add_argument("--ref", required=True, help="folder of reference images or a stats .npz")
    p.add_argument("--out", default=None, help="JSON file for the metrics")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--min-samples", type=int, default=2048)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench-mixture", help="Gaussian-mixture benchmark with known truth")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test budget")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds")
    p.add_argument("--T", type=int, nargs="+", default=None, help="override the list of T")
    p.add_argument("--workers", type=int, default=None, help="parallel training processes")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of bench.methods")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=_cmd_bench_mixture)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ldm_smd.callbacks import NonFiniteError
    from ldm_smd.checkpoints import CheckpointError
    from ldm_smd.config import ConfigError
    from ldm_smd.data.decode import CorruptImageError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, NonFiniteError,
            CorruptImageError) as exc:
        print(f"ldm-smd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
