"""Peak memory of one case of ``scripts/benchmark.py``, measured in a fresh process.

One job: ``python scripts/benchmark_memory.py CASE WIDTH BATCH IMAGE_SIZE THREADS KERNELS``
builds the case (:mod:`benchmark_cases`) under the kernel set ``KERNELS``, makes one sample step
and one steady-state train step, and prints their resident-set peaks as one JSON line;
:func:`measure_memory` runs it as a subprocess, so no case inherits another's allocations.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmark.py, before torch loads

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from benchmark_cases import make_state  # noqa: E402

from ldm_smd.jsonio import dumps  # noqa: E402

THREADS = 2


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
                 threads: int = THREADS, kernels: str = "all") -> dict:
    """In a fresh process: build the case, then one sample step and one train step; RSS in MiB.

    AdamW state is created first (one step on zero gradients), so the train step is a
    steady-state one. Peaks are VmHWM of /proc/self/status (which, unlike ``ru_maxrss``, is
    not inherited from the parent through fork and exec), reset before each step.
    """
    torch.set_num_threads(threads)
    state = make_state(name, width, batch=batch, image_size=image_size, kernels=kernels)
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
                   threads: int = THREADS, kernels: str = "all") -> dict:
    """:func:`memory_child` of one case in a fresh subprocess of this script."""
    cmd = [sys.executable, str(Path(__file__).resolve()), name, str(width), str(batch),
           str(image_size), str(threads), kernels]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark: memory subprocess for {name} (width {width}) failed:\n"
                           f"{proc.stderr[-2000:]}")
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    case, width, batch, size, threads = sys.argv[1], *map(int, sys.argv[2:6])
    print(dumps(memory_child(case, width, batch, size, threads, sys.argv[6])))
