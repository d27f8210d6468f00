"""The main job on the built-in dataset, end to end, on a CPU in minutes (``make demo``).

1. stage 1: train a small KL autoencoder on the synthetic shapes (configs/demo/autoencoder.yaml)
   and write its reconstructions beside the inputs;
2. estimate the latent scale factor (``ldm-smd scale-factor``);
3. stage 2: train an SMD latent diffusion model on its latents (configs/demo/ldm-smd.yaml);
4. sample a grid with a fixed seed and print its path;
5. show what SMD is for: on the 8-Gaussian ring at T = 2 steps, vanilla, SMD (the shipped
   default, ``smd_energy``) and the exact posterior side by side (the known-truth benchmark,
   ``ldm-smd bench-mixture``, one seed and a shorter budget), and print its path.

Extra ``key.path=value`` arguments are passed to both training stages' trainer, e.g.
``python scripts/demo.py --ae-steps 50 --ldm-steps 50`` for a smoke run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldm_smd.cpu import share_cores_politely

share_cores_politely()  # OpenMP's wait policy for a shared machine, before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm_smd.bench.runner import run_mixture_benchmark  # noqa: E402
from ldm_smd.config import instantiate, load_config  # noqa: E402
from ldm_smd.convert import load_first_stage  # noqa: E402
from ldm_smd.images import save_grid  # noqa: E402
from ldm_smd.latent_scale import scale_factor_command  # noqa: E402
from ldm_smd.sample import sample_to_dir  # noqa: E402
from ldm_smd.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def reconstruction_grid(ckpt: Path, config: Path, out: Path, n: int = 8) -> tuple[Path, float]:
    """Inputs (top row) above their reconstructions (bottom row); returns the path and PSNR."""
    autoencoder, _ = load_first_stage(str(ckpt))
    data = instantiate(load_config(config)["data"])
    data.setup("fit")
    images = next(iter(data.train_dataloader()))["image"][:n]
    with torch.no_grad():
        recon = autoencoder.decode(autoencoder.encode(images).mode()).clamp(-1, 1)
    mse = torch.mean(((recon - images) / 2) ** 2).item()
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
    return save_grid(torch.cat([images, recon]), out, nrow=n), psnr


def smd_picture(out: Path, *, steps: int) -> tuple[Path, dict[str, float]]:
    """Ring8 at T = 2: vanilla, SMD and the exact posterior side by side; returns the picture's
    path and each method's sliced Wasserstein distance to the mixture."""
    from ldm_smd.eval import plots

    config = ROOT / "configs/mixture/ring8.yaml"
    methods = ["vanilla", "smd_energy", "exact_posterior"]
    result = run_mixture_benchmark(
        config, out_dir=out, methods=methods[:2], T_list=[2], seeds=[0], progress=False,
        overwrite=True,  # the demo redoes its own runs (a second `make demo`)
        overrides=[f"trainer.max_steps={steps}", "bench.num_samples=10000",
                   "bench.sample_batch=10000"],
    )
    sw = {m: result["summary"][m]["2"]["sw"][0] for m in methods}
    removed = result["summary"]["smd_energy"]["2"]["sw_removed"][0]
    samples = {(m, 2): np.load(out / "samples" / f"{m}_T2_seed0.npz")["samples"]
               for m in methods}
    titles = {"vanilla": f"vanilla (SW {sw['vanilla']:.3f})",
              "smd_energy": f"SMD (SW {sw['smd_energy']:.3f}, {100 * removed:.0f}% of gap)",
              "exact_posterior": f"exact posterior (SW {sw['exact_posterior']:.3f})"}
    mixture = instantiate(result["config"]["data"]["params"]["mixture"])
    path = plots.sample_scatter(samples, mixture, methods, [2], out / "smd_ring8_T2.png",
                                transpose=True, titles=titles)
    return Path(path), sw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the whole demo")
    parser.add_argument("--ae-steps", type=int, default=None, help="override stage-1 steps")
    parser.add_argument("--ldm-steps", type=int, default=None, help="override stage-2 steps")
    parser.add_argument("--n", type=int, default=36, help="number of samples in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ring-steps", type=int, default=2700,
                        help="training steps of the ring8 picture's two models")
    args = parser.parse_args()
    out = Path(args.out)
    ae_cfg = ROOT / "configs/demo/autoencoder.yaml"
    ldm_cfg = ROOT / "configs/demo/ldm-smd.yaml"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    overrides = [f"run_dir={out / 'autoencoder'}"]
    if args.ae_steps:
        overrides.append(f"trainer.max_steps={args.ae_steps}")
    stage1 = train(ae_cfg, overrides, overwrite=True)  # the demo redoes its own runs
    recon_path, psnr = reconstruction_grid(
        stage1["checkpoint"], ae_cfg, out / "reconstructions.png"
    )
    timings["stage 1 (autoencoder)"] = time.perf_counter() - t

    t = time.perf_counter()
    scale = scale_factor_command(stage1["checkpoint"], ae_cfg, batches=4)
    timings["scale factor"] = time.perf_counter() - t

    t = time.perf_counter()
    overrides = [
        f"run_dir={out / 'ldm-smd'}",
        f"model.params.first_stage={stage1['checkpoint']}",
        f"model.params.scale_factor={scale:.6g}",
    ]
    if args.ldm_steps:
        overrides.append(f"trainer.max_steps={args.ldm_steps}")
    stage2 = train(ldm_cfg, overrides, overwrite=True)
    timings["stage 2 (SMD latent diffusion)"] = time.perf_counter() - t

    t = time.perf_counter()
    result = sample_to_dir(stage2["checkpoint"], out / "samples", n=args.n, seed=args.seed,
                           batch_size=args.n, progress=False, overwrite=True)
    timings["sampling"] = time.perf_counter() - t

    t = time.perf_counter()
    picture, sw = smd_picture(out / "mixture-ring8", steps=args.ring_steps)
    timings["SMD vs vanilla on ring8, T = 2"] = time.perf_counter() - t

    print("\n[ldm-smd demo] wall time per stage:")
    for name, seconds in timings.items():
        print(f"  {name:34s} {seconds:7.1f} s")
    print(f"  {'total':34s} {sum(timings.values()):7.1f} s")
    print(f"[ldm-smd demo] latent scale factor: {scale:.4g}; reconstruction PSNR {psnr:.1f} dB")
    print(f"[ldm-smd demo] reconstructions (inputs above outputs): {recon_path}")
    print(f"[ldm-smd demo] sample grid: {result['grid']}")
    print(f"[ldm-smd demo] ring8 at T = 2 steps, sliced Wasserstein distance to the mixture: "
          f"vanilla {sw['vanilla']:.3f}, SMD {sw['smd_energy']:.3f}, exact posterior "
          f"{sw['exact_posterior']:.3f}")
    print(f"[ldm-smd demo] vanilla, SMD and the exact posterior side by side: {picture}")


if __name__ == "__main__":
    main()
