"""The ``ldm-smd`` command line: argument parsing, then one call into the package.

Only the standard library is imported here; each command imports what it needs when it runs, so
``ldm-smd --help`` answers at once, and a missing ``--config`` file is named before the heavy
imports. Every named error (:class:`ldm_smd.errors.LdmSmdError`) is printed as
``ldm-smd CMD: error: MESSAGE`` with exit status 2, like argparse's own errors; the traceback is
printed too with ``--debug`` or ``LDM_SMD_DEBUG=1``. Ctrl-C is one line too,
``ldm-smd CMD: interrupted: WHAT WAS KEPT``, with exit status 130. Before torch is imported the
OpenMP settings for a shared machine are made (:mod:`ldm_smd.cpu`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from ldm_smd.cpu import share_cores_politely

DESCRIPTION = (
    "Latent diffusion with Soft Mixture Denoising (Li, van Breugel, van der Schaar, ICLR 2024):\n"
    "train, sample, estimate the latent scale factor, evaluate."
)
DEBUG_ENV = "LDM_SMD_DEBUG"  # the same name as ldm_smd.errors.DEBUG_ENV (not imported: startup)
EPILOG = f"""\
example:
  ldm-smd train --config configs/demo/autoencoder.yaml

`ldm-smd CMD --help` shows a command's options, defaults and an example. Errors are one line,
`ldm-smd CMD: error: ...`, exit status 2; --debug (or {DEBUG_ENV}=1) adds the traceback.
Ctrl-C stops cleanly (exit status 130) and says what was kept."""
DEBUG_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                "": False, "0": False, "false": False, "no": False, "off": False}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and adds ``(default: X)`` where an option has a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and action.option_strings
            and action.nargs != 0
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are the one line ``PROG: error: MESSAGE`` (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# ----------------------------------------------------------------------------- commands


def _config_file(path: str | None) -> None:
    """A missing ``--config`` file is named before the package's heavy imports."""
    if path is not None and not Path(path).is_file():
        from ldm_smd.errors import UsageError

        what = "is a folder, not a file" if Path(path).is_dir() else "not found"
        raise UsageError(f"--config {path}: config file {what}")


def _cmd_train(args: argparse.Namespace) -> None:
    _config_file(args.config)
    from ldm_smd.train import train

    train(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)


def _cmd_sample(args: argparse.Namespace) -> None:
    from ldm_smd.sample import sample_to_dir

    result = sample_to_dir(
        args.ckpt, args.out, n=args.n, steps=args.steps, sampler=args.sampler,
        spacing=args.spacing, ddim_eta=args.ddim_eta, seed=args.seed, batch_size=args.batch_size,
        use_ema=not args.no_ema, device=args.device, progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"[ldm-smd] {args.n} samples in {result['seconds']:.1f} s")
    shown = (f" (the first {result['grid_count']} of {args.n} samples)"
             if result["grid_count"] < args.n else "")
    print(f"[ldm-smd] grid: {result['grid']}{shown}")
    print(f"[ldm-smd] images: {result['images']}  arrays: {result['npz']}")


def _cmd_scale_factor(args: argparse.Namespace) -> None:
    _config_file(args.config)
    from ldm_smd.latent_scale import scale_factor_command

    value = scale_factor_command(args.ckpt, args.config, batches=args.batches, write=args.write)
    print(f"{value:.6g}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ldm_smd.eval.evaluate import evaluate, format_result

    def report(metrics: dict) -> None:
        print(format_result(metrics), flush=True)

    evaluate(
        args.samples, args.ref, out_json=args.out, batch_size=args.batch_size,
        device=args.device, weights_path=args.inception_weights, min_samples=args.min_samples,
        report=report,
    )
    if args.out:
        print(f"[ldm-smd] metrics written to {args.out}")


def _cmd_bench(args: argparse.Namespace) -> None:
    _config_file(args.config)
    from ldm_smd.bench.runner import load_bench_config, run_benchmark
    from ldm_smd.fileio import check_writable

    load_bench_config(args.config, args.overrides, quick=args.quick)  # every key, before work
    config = Path(args.config)
    out = Path(args.out) if args.out else Path("runs") / config.parent.name / config.stem
    check_writable(out, what="--out", folder=True)
    result = run_benchmark(
        args.config, out_dir=out, overrides=args.overrides, quick=args.quick, seeds=args.seeds,
        T_list=args.T, workers=args.workers, methods=args.methods, resume=args.resume,
        overwrite=args.overwrite,
    )
    print(result.get("table", ""))
    print(f"[ldm-smd] benchmark written to {out} (results.md, results.json, metrics_vs_T.png)")


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ldm_smd.data.mnist5k import split_file
    from ldm_smd.eval.classifier import (
        CLASSIFIER_NAME,
        describe,
        save_classifier,
        train_classifier,
    )
    from ldm_smd.fileio import check_writable

    out = Path(args.out) if args.out else Path(args.data) / CLASSIFIER_NAME
    for split in ("train", "heldout"):
        split_file(args.data, split)
    check_writable(out, what="--out", folder=False)
    options = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    model, meta = train_classifier(args.data, **options,
                                   progress=lambda line: print(f"[ldm-smd] {line}", flush=True))
    save_classifier(model, meta, out)
    print(f"[ldm-smd] {describe(meta)}")
    print(f"[ldm-smd] classifier written to {out}")


def _cmd_score_images(args: argparse.Namespace) -> None:
    from ldm_smd.eval.image_scores import score_images_command

    score_images_command(args.samples, args.data, classifier=args.classifier, out=args.out,
                         batch_size=args.batch_size)
    if args.out:
        print(f"[ldm-smd] scores written to {args.out}")


# ----------------------------------------------------------------------------- the parser


def _command(sub: argparse._SubParsersAction, name: str, summary: str, example: str,
             notes: str = "", aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    epilog = f"example:\n  {example}" + (f"\n\n{notes}" if notes else "")
    p = sub.add_parser(name, help=summary, description=summary, epilog=epilog,
                       formatter_class=_Formatter, aliases=list(aliases))
    p.add_argument("--debug", action="store_true",
                   help=f"print the full traceback of an error (or set {DEBUG_ENV}=1)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm-smd", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", dest="debug_all",
                        help=f"print the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = _command(
        sub, "train", "train stage 1 or stage 2 from a config",
        "ldm-smd train --config configs/demo/autoencoder.yaml trainer.max_steps=200",
        "A run_dir that already holds a run is refused: continue it with --resume RUN_DIR,\n"
        "start it over with --overwrite, or give another run_dir=...",
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML config (target/params blocks); with --resume, default: the run "
                        "folder's config.yaml")
    p.add_argument("--resume", metavar="RUN_DIR|CKPT",
                   help="continue a run exactly, from its folder (checkpoints/last.ckpt) or "
                        "a checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in run_dir (config.yaml, checkpoints/, logs/, "
                        "samples/) once every check passed, then train anew")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="config overrides (a mapping replaces the whole block); ~KEY.PATH "
                        "deletes a key")
    p.set_defaults(func=_cmd_train)

    p = _command(
        sub, "sample", "sample images from a stage-2 checkpoint",
        "ldm-smd sample --ckpt runs/demo/ldm-smd/checkpoints/last.ckpt --sampler ddim "
        "--steps 50 --n 64 --out samples/run1",
        "Writes OUT/images/000000.png ..., OUT/samples.npz and OUT/grid.png (the first 64\n"
        "samples, enlarged to a readable size). Sample i of seed S comes from its own\n"
        "generator, seeded derive_seed(S, i): the same files for any --batch-size, and\n"
        "unrelated sets for different seeds. Ctrl-C keeps the complete images (exit 130).",
    )
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="stage-2 checkpoint (.ckpt)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: new or empty (see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="first remove the previous samples in --out (grid.png, samples.npz, "
                        "images/); a folder holding other files is still refused")
    p.add_argument("--n", type=_positive, default=16, help="number of samples")
    p.add_argument("--steps", type=_positive, default=None,
                   help="sampler steps, 1..T (default: the checkpoint's "
                        "model.params.sampler.params.steps, else T)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=None,
                   help="sampler (default: the checkpoint's model.params.sampler.params.kind)")
    p.add_argument("--spacing", choices=["uniform", "trailing", "quadratic"], default=None,
                   help="timestep spacing (default: the checkpoint's, else uniform)")
    p.add_argument("--ddim-eta", type=_non_negative_float, default=None, metavar="ETA",
                   help="DDIM stochasticity: 0 deterministic, 1 DDPM-like (default: the "
                        "checkpoint's, else 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the whole set of samples, 0 .. 2**32 - 1")
    p.add_argument("--batch-size", type=_positive, default=16,
                   help="samples per batch (does not change the samples)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, "
                        "else cpu)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_sample)

    p = _command(
        sub, "scale-factor", "estimate 1/std of a first stage's latents",
        "ldm-smd scale-factor --ckpt runs/demo/autoencoder/checkpoints/last.ckpt "
        "--config configs/demo/autoencoder.yaml --write my-stage2.yaml",
        "Prints the value. --write stores it as model.params.scale_factor of a stage-2 config\n"
        "(one whose model takes a scale_factor and has a first stage); the value in a config\n"
        "wins over the first stage's own (a diffusers VAE's scaling_factor).",
    )
    p.add_argument("--ckpt", required=True, metavar="CKPT|DIR",
                   help="first stage: our stage-1 .ckpt, a CompVis model.ckpt or a diffusers "
                        "AutoencoderKL folder")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="a config whose data block gives the images")
    p.add_argument("--batches", type=_positive, default=8, help="batches of data to use")
    p.add_argument("--write", default=None, metavar="STAGE2.yaml",
                   help="stage-2 config to write the value into (default: only print it)")
    p.set_defaults(func=_cmd_scale_factor)

    p = _command(
        sub, "eval", "FID / KID / precision-recall of a sample folder",
        "ldm-smd eval --samples samples/run1/images --ref data/cifar10/train --out fid.json",
        "Needs the pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth) in\n"
        "$TORCH_HOME/hub/checkpoints/, $LDM_SMD_INCEPTION_WEIGHTS or --inception-weights.\n"
        "The metrics are printed, and also written to --out when given.",
    )
    p.add_argument("--samples", required=True, metavar="DIR|NPZ",
                   help="folder of PNG samples, or a uint8 (N, H, W, C) .npz")
    p.add_argument("--ref", required=True, metavar="DIR|NPZ",
                   help="folder of reference images or a statistics .npz (mu, sigma)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the metrics to this JSON file (default: print only)")
    p.add_argument("--batch-size", type=_positive, default=50, help="Inception batch size")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="the Inception weights file (default: $LDM_SMD_INCEPTION_WEIGHTS, then "
                        "the torch hub cache)")
    p.add_argument("--min-samples", type=_positive, default=2048,
                   help="fewer samples is an error; FID needs 2048 (lower only for smoke tests)")
    p.set_defaults(func=_cmd_eval)

    p = _command(
        sub, "bench", "benchmark: train every method at every T and seed, score, tabulate",
        "ldm-smd bench --config configs/bench/mnist5k-pixel.yaml --quick",
        "Runs the benchmark of a config with a bench: block: configs/mixture/*.yaml (Gaussian\n"
        "mixtures, exact metrics) or configs/bench/*.yaml (MNIST-5k images, scored by the\n"
        "domain classifier). `bench-mixture` is the same command.\n"
        "An --out folder that already holds a benchmark is refused: continue it with --resume\n"
        "(of the same config file), start it over with --overwrite, or give another --out.",
        aliases=["bench-mixture"],
    )
    p.add_argument("--config", required=True, metavar="FILE",
                   help="benchmark config (configs/mixture/*.yaml, configs/bench/*.yaml)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/CONFIG_FOLDER/CONFIG_NAME, e.g. "
                        "runs/mixture/ring8)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test budget")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="override the config's seeds (integers 0 .. 2**32 - 1)")
    p.add_argument("--T", type=_positive, nargs="+", default=None,
                   help="override the config's list of T")
    p.add_argument("--workers", type=_positive, default=None,
                   help="parallel training processes (default: the config's bench.workers)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="run a subset of the config's bench.methods (default: all)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the benchmark of the same config in --out: keep each "
                            "finished run whose saved config and scoring options are this "
                            "one's, run the rest (the replaced runs are named)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the benchmark in --out: its own files (runs.jsonl, "
                            "results.*, bench.json, the plots, samples/RUN.npz, grids/, runs/RUN/, "
                            "first_stage/) are deleted once the first new run has finished, and "
                            "listed; nothing else there")
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="config overrides, applied to the base config before the methods")
    p.set_defaults(func=_cmd_bench)

    p = _command(
        sub, "train-classifier", "train the MNIST-5k domain classifier that scores samples",
        "ldm-smd train-classifier --data data/mnist5k",
        "Trains a small CNN on DATA/train.npz (deterministic on the CPU), prints its accuracy on\n"
        "DATA/heldout.npz and writes it (safetensors, with that accuracy, the training options\n"
        "and the data's hash) to --out. Prepare DATA first: python scripts/prepare_mnist5k.py",
    )
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a prepared MNIST-5k folder (train.npz, heldout.npz)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the classifier (default: DATA/classifier.safetensors)")
    p.add_argument("--epochs", type=_positive, default=None,
                   help="passes over the train split (default: the package's, 15)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initialisation, the order and the augmentation (default: 0)")
    p.set_defaults(func=_cmd_train_classifier)

    p = _command(
        sub, "score-images", "score digit samples against MNIST-5k (FD, legibility, ...)",
        "ldm-smd score-images --samples samples/run1 --data data/mnist5k --out scores.json",
        "Prints fd (Frechet distance on the domain classifier's features), confident (share\n"
        "labelled with confidence >= 0.9), class_kl (KL of the class histogram) and nn_dist\n"
        "(distance to the nearest train image) beside their floor: the held-out digits.\n"
        "Needs the classifier: ldm-smd train-classifier --data DATA",
    )
    p.add_argument("--samples", required=True, metavar="NPZ|DIR",
                   help="a samples.npz, a folder holding one, or a folder of PNG images")
    p.add_argument("--data", required=True, metavar="DIR", help="the prepared MNIST-5k folder")
    p.add_argument("--classifier", default=None, metavar="FILE",
                   help="the classifier (default: DATA/classifier.safetensors)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the scores and the floor to this JSON file")
    p.add_argument("--batch-size", type=_positive, default=500, help="classifier batch size")
    p.set_defaults(func=_cmd_score_images)
    return parser


def _debug_requested(args: argparse.Namespace) -> bool:
    """``--debug``, or ``LDM_SMD_DEBUG`` set to 1 / true / yes / on (0 / false / no / off and
    empty are off; anything else is a usage error, before any work)."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    if value not in DEBUG_VALUES:
        from ldm_smd.errors import UsageError

        raise UsageError(f"{DEBUG_ENV}={os.environ[DEBUG_ENV]!r}: use 1 (or true, yes, on) to "
                         "show tracebacks, 0 (or false, no, off) or nothing not to")
    return bool(args.debug or args.debug_all or DEBUG_VALUES[value])


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0; 2 for a named or usage error; 130 when
    Ctrl-C stopped it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    share_cores_politely()
    from ldm_smd.errors import WRITE_ERRNOS, LdmSmdError, describe_os_error

    debug = False
    try:
        debug = _debug_requested(args)
        args.func(args)
    except LdmSmdError as exc:
        error: BaseException = exc
        message = str(exc)
    except OSError as exc:  # a write that no named check caught: still one line, naming the path
        if exc.errno not in WRITE_ERRNOS:
            raise
        error, message = exc, f"could not write {describe_os_error(exc)}"
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exception(exc)
        print(f"\nldm-smd {args.command}: interrupted: {exc or 'stopped by Ctrl-C'}",
              file=sys.stderr)
        return 130
    else:
        return 0
    if debug:
        traceback.print_exception(error)
    print(f"ldm-smd {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
