"""Quality against the number of sampling steps, for several checkpoints (vanilla, SMD, ...).

    python scripts/sweep_steps.py --ckpt vanilla=runs/v/last.ckpt --ckpt smd=runs/s/last.ckpt \
        --steps 5 10 20 50 100 --ref data/cifar10_train_stats.npz --n 50000 --out-dir sweep/

For every checkpoint and every number of steps: sample ``--n`` images with
``ldm_smd.sample.sample_to_dir`` (seeded: sample ``i`` comes from ``derive_seed(--seed, i)``,
see ``ldm_smd.rng``), then score them: ``--metric fid`` (default) runs
:func:`ldm_smd.eval.evaluate.evaluate` against ``--ref`` (FID, KID, precision / recall;
needs the Inception weights, see ``ldm-smd eval``);
``--metric mixture`` scores image-prototype samples exactly against the mixture of
``--mixture-config`` (no Inception). Writes ``sweep.md``, ``sweep.json`` and ``sweep.png``
(the metric against steps, one curve per checkpoint) into ``--out-dir``. FID needs at least
2,048 samples and the standard protocol uses 50,000 (the default of ``--n``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def _score_mixture(npz: Path, mixture_config: str, seed: int) -> dict[str, float]:
    from ldm_smd.blocks import instantiate
    from ldm_smd.config import load_config
    from ldm_smd.eval.fid import load_uint8_array
    from ldm_smd.eval.mixture_metrics import mixture_metrics

    mixture = instantiate(load_config(mixture_config)["data"]["params"]["mixture"])
    images = torch.from_numpy(load_uint8_array(npz)).permute(0, 3, 1, 2).double()
    x = images / 127.5 - 1.0  # undo the pinned uint8 quantisation
    return mixture_metrics(x.reshape(x.shape[0], -1), mixture, seed=seed)


def run_sweep(args: argparse.Namespace) -> dict:
    from ldm_smd.eval.plots import metric_against_steps
    from ldm_smd.jsonio import write_json
    from ldm_smd.sample import sample_to_dir

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = dict(item.split("=", 1) if "=" in item else (Path(item).stem, item)
                 for item in args.ckpt)
    rows = []
    for label, ckpt in ckpts.items():
        for steps in args.steps:
            sample_dir = out / "samples" / f"{label}_steps{steps}"
            (sample_dir / "eval.json").unlink(missing_ok=True)  # a re-run redoes the sweep's own
            written = sample_to_dir(ckpt, sample_dir, n=args.n, steps=steps, sampler=args.sampler,
                                    seed=args.seed, batch_size=args.batch_size,
                                    device=args.device, overwrite=True)
            if args.metric == "fid":
                from ldm_smd.eval.evaluate import evaluate

                metrics = evaluate(written["images"], args.ref, out_json=sample_dir / "eval.json",
                                   batch_size=args.eval_batch_size, device=args.device or "cpu",
                                   weights_path=args.inception_weights,
                                   min_samples=args.min_samples)
            else:
                metrics = _score_mixture(Path(written["npz"]), args.mixture_config, args.seed)
            row = {"checkpoint": label, "path": str(ckpt), "steps": steps,
                   "sample_seconds": float(written.get("seconds", float("nan"))), **metrics}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}),
                  flush=True)
    keys = (["fid", "kid_mean", "precision", "recall"] if args.metric == "fid"
            else ["precision", "recall", "kl", "spread", "logp_mean", "sw", "sw_floor"])
    lines = ["| checkpoint | steps | " + " | ".join(keys) + " | sample s |",
             "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        vals = " | ".join("n/a" if r.get(k) is None else f"{r[k]:.4g}" for k in keys)
        lines.append(f"| {r['checkpoint']} | {r['steps']} | {vals} | {r['sample_seconds']:.0f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    write_json(out / "sweep.json", rows)
    plot_key = args.plot_metric or ("fid" if args.metric == "fid" else "sw")
    curves = {label: {r["steps"]: r[plot_key] for r in rows if r["checkpoint"] == label
                      and r.get(plot_key) is not None and math.isfinite(r[plot_key])}
              for label in ckpts}
    metric_against_steps(curves, out / "sweep.png", ylabel=plot_key,
                         title=f"{plot_key} against sampling steps ({args.sampler})")
    print("\n".join(lines))
    return {"rows": rows, "table": out / "sweep.md", "plot": out / "sweep.png"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True,
                   help="LABEL=PATH of a stage-2 checkpoint (repeat: vanilla, SMD, ...)")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="numbers of steps")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--metric", choices=("fid", "mixture"), default="fid")
    p.add_argument("--ref", help="reference image folder or .npz statistics (--metric fid)")
    p.add_argument("--mixture-config", help="configs/mixture/*.yaml (--metric mixture)")
    p.add_argument("--n", type=int, default=50_000, help="samples per point (FID: >= 2048)")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpmpp"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch size")
    p.add_argument("--eval-batch-size", type=int, default=50, help="Inception batch size")
    p.add_argument("--device", default=None)
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    p.add_argument("--min-samples", type=int, default=2048,
                   help="FID minimum sample count; lower only for smoke tests")
    p.add_argument("--plot-metric", default=None, help="metric to plot (default fid / sw)")
    args = p.parse_args(argv)
    if args.metric == "fid" and not args.ref:
        p.error("--metric fid needs --ref (image folder or .npz statistics)")
    if args.metric == "mixture" and not args.mixture_config:
        p.error("--metric mixture needs --mixture-config")
    if args.metric == "fid" and args.n < args.min_samples:
        p.error(f"--n {args.n} is below --min-samples {args.min_samples}: FID needs at least "
                f"2048 samples (standard: 50,000); lower --min-samples only for smoke tests")
    return args


if __name__ == "__main__":
    run_sweep(parse_args(sys.argv[1:]))
