"""Cost of SMD against vanilla, and of our UNet against diffusers' UNet2DModel (CPU, fp32).

    python scripts/benchmark.py --out bench/benchmark.json            # full run (make bench)
    python scripts/benchmark.py --quick                                # small, fast run
    python scripts/benchmark.py --widths 64 128 --reps 5 --batch 16
    python scripts/benchmark.py --widths 64 --kernels all none   # kernel sets

Cases per width ``w`` (32x32x3 inputs, CIFAR-like DDPM backbone: channel_mult 1,2,2,2,
num_res_blocks 2, attention at 16x16, one head; the same backbone in every case):

- ``vanilla``: our UNetModel, objective ``vanilla``;
- ``smd_paper``: SMDNetwork (latent_dim 100, 2 hypernetwork layers, tanh bound), ``smd_paper``;
- ``smd_paper_unbounded``: the same with ``hypernet_bound: none`` (the reference form);
- ``smd_energy_M4`` / ``smd_energy_M8``: the default SMD, ``smd_energy`` with 4 / 8 eta draws
  and placement ``output`` (one hypernetwork before the output convolution): the draws share one
  backbone pass, only ``g``, the hypernetwork and the output convolution run once per draw;
- ``smd_image_M2`` / ``smd_image_M4``: SMD with a per-picture latent (``image_latent_dim`` 32,
  placement ``none``), ``smd_energy`` with 2 / 4 draws: the draws share the encoder half's pass,
  the middle block and the decoder run once per draw;
- ``smd_deviation_M4``: the per-picture latent on the deviation path (``draw_path: deviation``):
  the backbone (the regression) runs once, a small deviation head once per draw;
- ``smd_mixture_M4``: ``smd_mixture`` with 4 eta samples at the reference placement (the network
  sees 4x the rows); its train time is also reported per eta sample;
- ``smd_reference_dxd``: the reference implementation's cost model, a hypernetwork that builds
  the d x d matrix ``M_l = v_l v_l^T + softplus(s_l) I`` at every pixel and multiplies by it
  (:class:`DenseHypernetwork`, same function as ours, unbounded form), ``smd_paper``;
- ``diffusers_unet2d``: diffusers' UNet2DModel with the same layout (block_out_channels
  ``w * (1, 2, 2, 2)``, 2 layers per block, attention at 16x16, one head), which has exactly
  our vanilla's parameter count; objective ``vanilla``.

Kernels (``--kernels SPEC ...``, :mod:`ldm_smd.nn.kernels`): every case is built once per kernel
set and its steps run under that set; ratios are against the vanilla of the same width and
kernel set, and each further set is compared with the first, case by case, so a kernel is kept
only where it pays.

Timing: every case is built once in this process and timed round-robin (rep r runs every
case once, in an order rotated by r), so all cases see the same machine load; the median over
``--reps`` repetitions after ``--warmup`` untimed ones is reported. Train step = zero_grad +
objective (forward + loss, ``ldm_smd.diffusion.objectives.build_objective``) + backward + AdamW
step. Sample step = one network call under ``torch.no_grad`` in eval mode, as a sampler makes.
Each step is also timed in process CPU time (summed over threads; ``*_cpu_ms``), which other
processes on a shared machine disturb far less than wall-clock time: the table shows the
CPU-time ratios in parentheses beside the wall-clock ones.

The pieces, one job each: ``benchmark_cases.py`` builds the cases, this file times them,
``benchmark_memory.py`` measures a case's memory in a fresh process, ``benchmark_report.py``
makes the rows, the table and the goal lines.

Peak memory: each case runs again in a fresh subprocess (``--memory subprocess``, the default),
so no case inherits another's allocations; it makes one sample step, then one steady-state train
step (AdamW state already created). ``peak_mem_mb`` is the peak resident set size of the train
step (VmHWM of /proc/self/status, reset before each step): it includes the interpreter, torch's
libraries (about 1 GB for this torch build), weights and optimizer state. ``train_mem_mb`` is
that peak minus the resident size before the steps (activations and gradients);
``sample_peak_mem_mb`` / ``sample_mem_mb`` are the same for the sample step.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared, loaded
# machine, spinning 2-thread teams were measured 10-20x slower per step (threads spin while the
# one doing the work is descheduled); override by setting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from benchmark_cases import CASE_NAMES, CaseState, make_state  # noqa: E402
from benchmark_memory import THREADS, measure_memory  # noqa: E402
from benchmark_report import goals, make_rows, markdown_table  # noqa: E402

from ldm_smd.jsonio import write_json  # noqa: E402
from ldm_smd.nn import kernels as nn_kernels  # noqa: E402
from ldm_smd.nn.unet import UNetModel  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    """(wall ms, process CPU ms summed over threads) of one call of ``fn``."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start) * 1000.0, (time.process_time() - cpu) * 1000.0


def time_round_robin(states: list[CaseState], *, reps: int, warmup: int,
                     log=print) -> None:
    """Fill ``train_ms`` / ``sample_ms`` of every state, interleaving the cases."""
    for state in states:
        for _ in range(warmup):
            state.train_step()
            state.sample_step()
    n = len(states)
    for rep in range(reps):
        for k in range(n):
            state = states[(k + rep) % n]
            for wall, cpu, step in ((state.train_ms, state.train_cpu_ms, state.train_step),
                                    (state.sample_ms, state.sample_cpu_ms, state.sample_step)):
                ms, cpu_ms = _timed(step)
                wall.append(ms)
                cpu.append(cpu_ms)
        log(f"  rep {rep + 1}/{reps} done, load average {os.getloadavg()[0]:.2f}")


def run(*, widths: list[int], cases: list[str], reps: int, warmup: int, batch: int,
        image_size: int, memory: str, threads: int = THREADS, kernel_sets: list[str] | None = None,
        log=print) -> dict:
    """Build, time and (optionally) measure memory of every case under every kernel set
    (specs of :func:`ldm_smd.nn.kernels.parse`; default: the process's own set); return the
    JSON payload."""
    kernel_sets = kernel_sets or [",".join(nn_kernels.active()) or "none"]
    for spec in kernel_sets:
        nn_kernels.parse(spec, source="--kernels")  # a bad name fails before any work
    torch.set_num_threads(threads)
    nn_dir = Path(sys.modules[UNetModel.__module__].__file__).parent
    sources = {f.name: hashlib.sha1(f.read_bytes()).hexdigest()[:12]
               for f in sorted(nn_dir.glob("*.py"))}  # which version of the networks ran
    load_start = os.getloadavg()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu_count "
        f"{os.cpu_count()}, load average at start {load_start}")
    states = [make_state(c, w, batch=batch, image_size=image_size, kernels=k)
              for w in widths for k in kernel_sets for c in cases]
    log(f"timing {len(states)} cases round-robin: {warmup} warm-up + {reps} reps")
    time_round_robin(states, reps=reps, warmup=warmup, log=log)
    load_end = os.getloadavg()
    mem: dict[tuple[str, int], dict] = {}
    if memory == "subprocess":
        for s in states:
            log(f"  memory: {s.name} w{s.width} kernels {s.kernels}")
            mem[(s.name, s.width, s.kernels)] = measure_memory(
                s.name, s.width, batch=batch, image_size=image_size, threads=threads,
                kernels=s.kernels)
    rows = make_rows(states, mem)
    return {"rows": rows, "load_average_start": list(load_start),
            "load_average_end": list(load_end),
            "settings": {"widths": widths, "batch": batch, "image_size": image_size,
                         "reps": reps, "warmup": warmup, "threads": threads,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                         "torch": torch.__version__, "memory": memory,
                         "kernel_sets": {k: sorted(nn_kernels.parse(k)) for k in kernel_sets},
                         "nn_sources_sha1": sources}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--quick", action="store_true",
                        help="small fast run: width 32, batch 4, 2 reps, 1 warm-up")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--cases", nargs="+", default=list(CASE_NAMES), choices=CASE_NAMES)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed reps (default 2)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 16)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (2)")
    parser.add_argument("--memory", choices=("subprocess", "none"), default="subprocess")
    parser.add_argument("--kernels", nargs="+", default=None, metavar="SPEC",
                        help="kernel sets of ldm_smd.nn.kernels to time the cases under, "
                             "interleaved: all | none | NAME,... | all,-NAME,... (default: the "
                             "LDM_SMD_KERNELS set, all when unset)")
    args = parser.parse_args(argv)
    quick = {"widths": [32], "reps": 2, "warmup": 1, "batch": 4}
    full = {"widths": [64, 128], "reps": 5, "warmup": 2, "batch": 16}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    payload = run(widths=args.widths, cases=args.cases, reps=args.reps, warmup=args.warmup,
                  batch=args.batch, image_size=args.image_size, memory=args.memory,
                  threads=args.threads, kernel_sets=args.kernels)
    print()
    print(markdown_table(payload["rows"]))
    print()
    for line in goals(payload["rows"]):
        print(line)
    print(f"load average (1, 5, 15 min): start {payload['load_average_start']}, "
          f"end {payload['load_average_end']}")
    if args.out is not None:
        write_json(args.out, payload, indent=2)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
