"""A training step on a shared machine: alone, and beside other busy processes, with OpenMP's
default wait policy and with the one ``ldm-smd`` sets (:mod:`ldm_smd.cpu`).

Each case is a fresh process (OpenMP reads its settings once) that trains ``--steps`` steps of
``--config`` (default: the demo's stage 1) and reports the mean time of the steps after the first
(the first pays for warm-up); ``--busy N`` starts N single-threaded busy loops
(``python -c "while True: pass"``) for the cases that share the machine, and stops them after.
It prints a table and what else was running (load average, the busiest processes), since a
machine shared with other people's jobs gives other figures::

    python scripts/bench_shared_cpu.py --steps 30 --busy 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_smd.cpu import POLITE_OPENMP  # noqa: E402  (stdlib only: torch is not imported here)


def _child(config: str, steps: int, overrides: list[str]) -> None:
    """Train ``steps`` steps in a temporary run folder; print the step times as JSON."""
    import lightning as L
    import torch

    from ldm_smd.config import load_config
    from ldm_smd.train import build_run

    class Times(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args: object) -> None:
            self.ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        conf = load_config(config, [
            f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
            "logging.tensorboard=false", "logging.csv=false", "checkpoint.every_n_train_steps=0",
            *overrides])
        times = Times()
        model, data, trainer = build_run(conf, Path(tmp), extra_callbacks=(times,))
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
    gaps = [b - a for a, b in zip(times.ends, times.ends[1:], strict=False)]
    print(json.dumps({"step_s": sum(gaps) / max(1, len(gaps)), "first_s": times.ends[0] - start,
                      "threads": torch.get_num_threads(),
                      "policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}))


def _run_case(args: argparse.Namespace, *, polite: bool, busy: int, threads: int) -> dict:
    env = dict(os.environ)
    for key in (*POLITE_OPENMP, "OMP_NUM_THREADS"):
        env.pop(key, None)
    if polite:
        env.update(POLITE_OPENMP)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--config", args.config, "--steps",
             str(args.steps), *args.overrides], env=env, capture_output=True, text=True,
            check=True).stdout
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    return {**json.loads(out.strip().splitlines()[-1]), "busy": busy}


def _machine() -> str:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    top = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True,
                         text=True).stdout.splitlines()[1:6]
    return f"load average {load}; busiest processes:\n  " + "\n  ".join(t[:110] for t in top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo/autoencoder.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", type=int, default=1, help="busy loops beside the shared cases")
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="OpenMP threads of the cases (0: torch's default, one per core)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, key.path=value")
    args = parser.parse_args()
    if args.child:
        _child(args.config, args.steps, args.overrides)
        return
    print(f"{os.cpu_count()} CPUs; before: {_machine()}")
    print(f"{'wait policy':>12} {'busy loops':>10} {'threads':>7} {'s/step':>8} {'first s':>8}")
    for busy in (0, args.busy):
        for threads in args.threads:
            for polite in (False, True):
                r = _run_case(args, polite=polite, busy=busy, threads=threads)
                print(f"{r['policy']:>12} {r['busy']:>10} {r['threads']:>7} "
                      f"{r['step_s']:>8.3f} {r['first_s']:>8.2f}", flush=True)
    print(f"after: {_machine()}")


if __name__ == "__main__":
    main()
