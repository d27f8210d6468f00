"""Cost of SMD against vanilla, and of our UNet against diffusers' UNet2DModel (CPU, fp32).

    python scripts/benchmark.py --out bench/benchmark.json            # full run (make bench)
    python scripts/benchmark.py --quick                                # small, fast run
    python scripts/benchmark.py --widths 64 128 --reps 5 --batch 16

Cases per width ``w`` (32x32x3 inputs, CIFAR-like DDPM backbone: channel_mult 1,2,2,2,
num_res_blocks 2, attention at 16x16, one head; the same backbone in every case):

- ``vanilla``: our UNetModel, objective ``vanilla``;
- ``smd_paper``: SMDNetwork (latent_dim 100, 2 hypernetwork layers, tanh bound), ``smd_paper``;
- ``smd_paper_unbounded``: the same with ``hypernet_bound: none`` (the reference form);
- ``smd_mixture_M4``: ``smd_mixture`` with 4 eta samples (the network sees 4x the rows); its
  train time is also reported per eta sample;
- ``smd_reference_dxd``: the reference implementation's cost model, a hypernetwork that builds
  the d x d matrix ``M_l = v_l v_l^T + softplus(s_l) I`` at every pixel and multiplies by it
  (:class:`DenseHypernetwork`, same function as ours, unbounded form), ``smd_paper``;
- ``diffusers_unet2d``: diffusers' UNet2DModel with the same layout (block_out_channels
  ``w * (1, 2, 2, 2)``, 2 layers per block, attention at 16x16, one head), which has exactly
  our vanilla's parameter count; objective ``vanilla``.

Timing: every case is built once in this process and timed round-robin (rep r runs every
case once, in an order rotated by r), so all cases see the same machine load; the median over
``--reps`` repetitions after ``--warmup`` untimed ones is reported. Train step = zero_grad +
objective (forward + loss, ``ldm_smd.diffusion.objectives.build_objective``) + backward + AdamW
step. Sample step = one network call under ``torch.no_grad`` in eval mode, as a sampler makes.
Each step is also timed in process CPU time (summed over threads; ``*_cpu_ms``), which other
processes on a shared machine disturb far less than wall-clock time: the table shows the
CPU-time ratios in parentheses beside the wall-clock ones.

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

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.diffusion.objectives import build_objective
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.nn.smd import Hypernetwork, SMDNetwork
from ldm_smd.nn.unet import UNetModel

CASE_NAMES = ("vanilla", "smd_paper", "smd_paper_unbounded", "smd_mixture_M4",
              "smd_reference_dxd", "diffusers_unet2d")
CHANNEL_MULT = (1, 2, 2, 2)
NUM_RES_BLOCKS = 2
ATTENTION_RESOLUTIONS = (2,)  # downsampling factor 2: 16x16 for 32x32 inputs
LATENT_DIM = 100
HYPERNET_LAYERS = 2
MIXTURE_M = 4
THREADS = 2


class DenseHypernetwork(Hypernetwork):
    """The reference implementation's cost model: ``M_l`` built as a d x d matrix per position.

    Same parameters (``A``, ``a``, ``W``, ``w``, ``s``, ``B``, ``b``) and same function as
    :class:`Hypernetwork`; only the evaluation differs: every per-position linear map is an
    ``einsum``, and each ``M_l = v_l v_l^T + softplus(s_l) I`` is materialised (``einsum`` outer
    product plus identity) and applied with ``torch.bmm``: O(d^2) per position. Both entry
    points are overridden: ``forward(h, z)`` and ``modulate(h, u_all)`` (the one SMDNetwork
    calls, with the unscaled directions ``u_l``, ``v_l = c u_l``); ``dense_calls`` counts them,
    so the benchmark can check that the dense path really ran.
    """

    dense_calls = 0

    def _scale(self) -> float:
        """``c`` in ``v_l = c u_l``: ``1 / sqrt(d)`` with the tanh bound, 1 without."""
        return 1.0 / math.sqrt(self.latent_dim) if self.bound == "tanh" else 1.0

    def _dense(self, h: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        """``h + B M_L .. M_1 (A h + a) + b`` for token rows ``h`` (N, C), vectors ``v_all``."""
        self.dense_calls += 1
        d = self.latent_dim
        r = (torch.einsum("dc,nc->nd", self.A, h) + self.a).unsqueeze(-1)  # (N, d, 1)
        eye = torch.eye(d, dtype=h.dtype, device=h.device)
        scales = F.softplus(self.s)
        for layer in range(self.num_layers):
            v = v_all[:, layer * d:(layer + 1) * d]
            m = torch.einsum("ni,nj->nij", v, v) + scales[layer] * eye  # (N, d, d)
            r = torch.bmm(m, r)
        return h + torch.einsum("cd,nd->nc", self.B, r.squeeze(-1)) + self.b

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            u = torch.einsum("kd,nd->nk", self.W, z) + self.w
            return self._dense(h, (torch.tanh(u) if self.bound == "tanh" else u) * self._scale())
        b, c, hh, ww = h.shape
        tokens = h.permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), N = B * H * W
        zt = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        u = torch.einsum("kd,nd->nk", self.W, zt) + self.w
        out = self._dense(tokens, (torch.tanh(u) if self.bound == "tanh" else u) * self._scale())
        return out.reshape(b, hh, ww, c).permute(0, 3, 1, 2)

    def modulate(self, h: torch.Tensor, u_all: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            return self._dense(h, u_all * self._scale())
        b, c, n = h.shape  # flattened maps (B, C, N), u_all (B, L d, N)
        out = self._dense(h.transpose(1, 2).reshape(-1, c),
                          u_all.transpose(1, 2).reshape(b * n, -1) * self._scale())
        return out.reshape(b, n, c).transpose(1, 2)


def make_dense(net: SMDNetwork) -> SMDNetwork:
    """Swap every hypernetwork of ``net`` for a :class:`DenseHypernetwork` with the same weights."""
    for site, old in list(net.hypernets.items()):
        dense = DenseHypernetwork(channels=old.channels, latent_dim=old.latent_dim,
                                  num_layers=old.num_layers, bound=old.bound)
        dense.load_state_dict(old.state_dict())
        net.hypernets[site] = dense
    return net


class DiffusersDenoiser(nn.Module):
    """diffusers' UNet2DModel behind our network call ``net(x_t, t, generator=None)``.

    Args:
        width: base width; block_out_channels = width * (1, 2, 2, 2).
        image_size: input height and width.
    """

    def __init__(self, *, width: int = 64, image_size: int = 32):
        super().__init__()
        from diffusers import UNet2DModel  # bench-only extra, imported only for this case

        down = ["DownBlock2D"] * len(CHANNEL_MULT)
        up = ["UpBlock2D"] * len(CHANNEL_MULT)
        for i in range(len(CHANNEL_MULT)):
            if 2 ** i in ATTENTION_RESOLUTIONS:
                down[i] = "AttnDownBlock2D"
                up[len(CHANNEL_MULT) - 1 - i] = "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=3, out_channels=3,
            block_out_channels=tuple(width * m for m in CHANNEL_MULT),
            layers_per_block=NUM_RES_BLOCKS, down_block_types=tuple(down),
            up_block_types=tuple(up), attention_head_dim=None,  # None: one head, as ours
            norm_num_groups=math.gcd(32, width),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        return self.unet(x_t, t).sample


def build_network(name: str, width: int, image_size: int = 32) -> nn.Module:
    """The network of case ``name`` at base width ``width`` (seeded, default initialisation)."""
    if name not in CASE_NAMES:
        raise ValueError(f"benchmark: unknown case {name!r}; cases are {list(CASE_NAMES)}")
    torch.manual_seed(0)
    if name == "diffusers_unet2d":
        return DiffusersDenoiser(width=width, image_size=image_size)
    unet = UNetModel(in_channels=3, out_channels=3, model_channels=width,
                     channel_mult=CHANNEL_MULT, num_res_blocks=NUM_RES_BLOCKS,
                     attention_resolutions=ATTENTION_RESOLUTIONS, norm_groups=32)
    if name == "vanilla":
        return unet
    bound = "tanh" if name in ("smd_paper", "smd_mixture_M4") else "none"
    net = SMDNetwork(backbone=unet, latent_dim=LATENT_DIM, hypernet_layers=HYPERNET_LAYERS,
                     hypernet_bound=bound)
    return make_dense(net) if name == "smd_reference_dxd" else net


def objective_for(name: str):
    """(objective, eta samples per example) of case ``name``."""
    if name == "smd_mixture_M4":
        return build_objective("smd_mixture", num_eta_samples=MIXTURE_M), MIXTURE_M
    if name in ("vanilla", "diffusers_unet2d"):
        return build_objective("vanilla"), 1
    return build_objective("smd_paper"), 1


@dataclass
class CaseState:
    """Everything one case needs to run train and sample steps."""

    name: str
    width: int
    net: nn.Module
    objective: object
    eta_samples: int
    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    schedule: NoiseSchedule
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    train_ms: list[float] = field(default_factory=list)
    sample_ms: list[float] = field(default_factory=list)
    train_cpu_ms: list[float] = field(default_factory=list)
    sample_cpu_ms: list[float] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def train_step(self) -> None:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.objective(self.net, self.x0, schedule=self.schedule,
                                 generator=self.generator)
        loss.backward()
        self.optimizer.step()

    def sample_step(self) -> None:
        self.net.eval()
        with torch.no_grad():
            self.net(self.x_t, self.t, generator=self.generator)


def make_state(name: str, width: int, *, batch: int = 16, image_size: int = 32) -> CaseState:
    """Build case ``name``: network, objective, AdamW, fixed data in [-1, 1], a generator."""
    net = build_network(name, width, image_size)
    objective, eta_samples = objective_for(name)
    data = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, 3, image_size, image_size, generator=data) * 2 - 1
    schedule = NoiseSchedule(kind="linear", num_timesteps=1000)
    t = torch.randint(0, 1000, (batch,), generator=data)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=data))
    if name == "smd_reference_dxd":
        with torch.no_grad():
            net(x_t[:2], t[:2])  # GroupNorm needs more than one value per group
        if not all(m.dense_calls for m in net.hypernets.values()):
            raise RuntimeError("benchmark: SMDNetwork no longer calls Hypernetwork.forward or "
                               ".modulate, so DenseHypernetwork is bypassed; update it")
    return CaseState(name=name, width=width, net=net, objective=objective,
                     eta_samples=eta_samples, x0=x0, x_t=x_t, t=t, schedule=schedule,
                     generator=torch.Generator().manual_seed(2),
                     optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4))


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


def _status_mb(key: str) -> float:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"benchmark: no {key} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); harmless where it is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_child(name: str, width: int, batch: int, image_size: int,
                 threads: int = THREADS) -> dict:
    """In a fresh process: build the case, then one sample step and one train step; RSS in MiB.

    AdamW state is created first (one step on zero gradients), so the train step is a
    steady-state one. Peaks are VmHWM of /proc/self/status (which, unlike ``ru_maxrss``, is
    not inherited from the parent through fork and exec), reset before each step.
    """
    torch.set_num_threads(threads)
    state = make_state(name, width, batch=batch, image_size=image_size)
    for p in state.net.parameters():
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    _reset_peak()
    base = _status_mb("VmRSS")
    state.sample_step()
    sample_peak = _status_mb("VmHWM")
    _reset_peak()
    state.train_step()
    peak = _status_mb("VmHWM")
    return {"peak_mem_mb": peak, "train_mem_mb": peak - base,
            "sample_peak_mem_mb": sample_peak, "sample_mem_mb": sample_peak - base,
            "rss_before_steps_mb": base}


def measure_memory(name: str, width: int, *, batch: int = 16, image_size: int = 32,
                   threads: int = THREADS) -> dict:
    """:func:`memory_child` of one case in a fresh subprocess of this script."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
           "--widths", str(width), "--batch", str(batch), "--image-size", str(image_size),
           "--threads", str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark: memory subprocess for {name} (width {width}) failed:\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_rows(states: list[CaseState], memory: dict[tuple[str, int], dict]) -> list[dict]:
    """One JSON row per case, with medians and ratios against the same width's vanilla."""
    rows = []
    base = {s.width: s for s in states if s.name == "vanilla"}
    for s in states:
        row: dict[str, object] = {
            "name": f"{s.name}@w{s.width}", "case": s.name, "width": s.width,
            "params": s.params, "train_step_ms": statistics.median(s.train_ms),
            "sample_step_ms": statistics.median(s.sample_ms),
            "peak_mem_mb": None, "eta_samples": s.eta_samples,
            "train_step_ms_per_eta": statistics.median(s.train_ms) / s.eta_samples,
            "train_step_ms_all": [round(v, 2) for v in s.train_ms],
            "sample_step_ms_all": [round(v, 2) for v in s.sample_ms],
            "train_step_cpu_ms": statistics.median(s.train_cpu_ms),
            "sample_step_cpu_ms": statistics.median(s.sample_cpu_ms),
        }
        row.update(memory.get((s.name, s.width), {}))
        van = base.get(s.width)
        if van is not None:
            row["train_ratio_vs_vanilla"] = row["train_step_ms"] / statistics.median(van.train_ms)
            row["train_ratio_per_eta_vs_vanilla"] = (
                row["train_step_ms_per_eta"] / statistics.median(van.train_ms))
            row["sample_ratio_vs_vanilla"] = (
                row["sample_step_ms"] / statistics.median(van.sample_ms))
            row["train_cpu_ratio_vs_vanilla"] = (
                row["train_step_cpu_ms"] / statistics.median(van.train_cpu_ms))
            row["sample_cpu_ratio_vs_vanilla"] = (
                row["sample_step_cpu_ms"] / statistics.median(van.sample_cpu_ms))
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (wall-clock medians; CPU-time ratios beside them)."""
    lines = ["| case | width | params | train step ms | train / vanilla (cpu) | sample step ms | "
             "sample / vanilla (cpu) | peak RSS MB | train adds MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = _fmt(r["train_step_ms"], ".1f")
        ratio = (f"{_fmt(r.get('train_ratio_vs_vanilla'), '.3f')} "
                 f"({_fmt(r.get('train_cpu_ratio_vs_vanilla'), '.3f')})")
        if r["eta_samples"] > 1:
            train += f" ({r['train_step_ms_per_eta']:.1f} per eta)"
            ratio += f"; per eta {r.get('train_ratio_per_eta_vs_vanilla', 0):.3f}"
        sample = (f"{_fmt(r.get('sample_ratio_vs_vanilla'), '.3f')} "
                  f"({_fmt(r.get('sample_cpu_ratio_vs_vanilla'), '.3f')})")
        lines.append(
            f"| {r['case']} | {r['width']} | {r['params']:,} | {train} | {ratio} | "
            f"{_fmt(r['sample_step_ms'], '.1f')} | {sample} | {_fmt(r['peak_mem_mb'], '.0f')} | "
            f"{_fmt(r.get('train_mem_mb'), '.0f')} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """Lines stating each goal and whether this run met it, on wall-clock and on CPU time."""
    out = []
    by = {(r["case"], r["width"]): r for r in rows}

    def ratio(a: dict, b: dict, key: str) -> str:
        wall, cpu = a[key + "_ms"] / b[key + "_ms"], a[key + "_cpu_ms"] / b[key + "_cpu_ms"]
        return f"{wall:.3f}x (cpu {cpu:.3f}x)"

    for width in sorted({r["width"] for r in rows}):
        van, smd = by.get(("vanilla", width)), by.get(("smd_paper", width))
        if van and smd:
            worst = max(smd["train_step_ms"] / van["train_step_ms"],
                        smd["sample_step_ms"] / van["sample_step_ms"])
            out.append(f"w{width}: SMD/vanilla train {ratio(smd, van, 'train_step')}, sample "
                       f"{ratio(smd, van, 'sample_step')} (goal <= 1.10x, wall): "
                       f"{'MET' if worst <= 1.10 else 'MISSED'}")
        ref = by.get(("smd_reference_dxd", width))
        if smd and ref:
            out.append(f"w{width}: reference d x d form / our O(d) SMD: train "
                       f"{ratio(ref, smd, 'train_step')}, sample {ratio(ref, smd, 'sample_step')}")
        dif = by.get(("diffusers_unet2d", width))
        if van and dif:
            speed = dif["train_step_ms"] / van["train_step_ms"]
            out.append(f"w{width}: params ours {van['params']:,} vs UNet2DModel {dif['params']:,}"
                       f"; UNet2DModel / ours train {ratio(dif, van, 'train_step')} (goal >= 1.2x,"
                       f" wall): {'MET' if speed >= 1.2 else 'MISSED'}; sample "
                       f"{ratio(dif, van, 'sample_step')}")
    return out


def run(*, widths: list[int], cases: list[str], reps: int, warmup: int, batch: int,
        image_size: int, memory: str, threads: int = THREADS, log=print) -> dict:
    """Build, time and (optionally) measure memory of every case; return the JSON payload."""
    torch.set_num_threads(threads)
    nn_dir = Path(sys.modules[UNetModel.__module__].__file__).parent
    sources = {f.name: hashlib.sha1(f.read_bytes()).hexdigest()[:12]
               for f in sorted(nn_dir.glob("*.py"))}  # which version of the networks ran
    load_start = os.getloadavg()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu_count "
        f"{os.cpu_count()}, load average at start {load_start}")
    states = [make_state(c, w, batch=batch, image_size=image_size)
              for w in widths for c in cases]
    log(f"timing {len(states)} cases round-robin: {warmup} warm-up + {reps} reps")
    time_round_robin(states, reps=reps, warmup=warmup, log=log)
    load_end = os.getloadavg()
    mem: dict[tuple[str, int], dict] = {}
    if memory == "subprocess":
        for s in states:
            log(f"  memory: {s.name} w{s.width}")
            mem[(s.name, s.width)] = measure_memory(s.name, s.width, batch=batch,
                                                    image_size=image_size, threads=threads)
    rows = make_rows(states, mem)
    return {"rows": rows, "load_average_start": list(load_start),
            "load_average_end": list(load_end),
            "settings": {"widths": widths, "batch": batch, "image_size": image_size,
                         "reps": reps, "warmup": warmup, "threads": threads,
                         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                         "torch": torch.__version__, "memory": memory,
                         "nn_sources_sha1": sources}}


def main(argv: list[str] | None = None) -> dict | None:
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
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"widths": [32], "reps": 2, "warmup": 1, "batch": 4}
    full = {"widths": [64, 128], "reps": 5, "warmup": 2, "batch": 16}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.widths[0], args.batch,
                                      args.image_size, args.threads)))
        return None
    payload = run(widths=args.widths, cases=args.cases, reps=args.reps, warmup=args.warmup,
                  batch=args.batch, image_size=args.image_size, memory=args.memory,
                  threads=args.threads)
    print()
    print(markdown_table(payload["rows"]))
    print()
    for line in goals(payload["rows"]):
        print(line)
    print(f"load average (1, 5, 15 min): start {payload['load_average_start']}, "
          f"end {payload['load_average_end']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
