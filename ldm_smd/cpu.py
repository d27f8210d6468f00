"""CPU threads on a shared machine: the OpenMP wait policy, set before torch is imported.

PyTorch's CPU kernels run on an OpenMP team of one thread per core. By default a thread that
finishes its share of a kernel spins, waiting for the others, before it sleeps. When another
process is busy on one of the cores, the thread that shares that core is descheduled while its
team-mates spin on the other cores for it: on two cores with one other single-threaded job, the
demo's stage 1 went from 38 s to 1,497 s. With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread
sleeps at once, so a busy core costs about its share, and a quiet machine loses little.

Measured with ``scripts/bench_shared_cpu.py`` (the demo's stage 1, 30 steps, seconds a step
after the first; 2 cores shared with other people's jobs, load average 4 to 8, so the figures
vary between runs): alone, 4.01 with the default policy, 0.75 passive; beside one more busy
loop, 11.4 default, 0.64 passive. One thread instead of two was 0.26 to 0.35 alone and 0.70
beside the busy loop: no better than two passive threads on a busy machine, and it would halve
a quiet one, so the number of threads stays torch's (one per core, or ``OMP_NUM_THREADS``).

:func:`share_cores_politely` is called by the command line (and ``scripts/demo.py``) before
torch is imported; OpenMP reads the variable once, when it starts, so a later call changes
nothing. A value the user set is kept. This module imports only the standard library.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: environment variables set (unless already set) before torch is imported
POLITE_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}


def share_cores_politely(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`POLITE_OPENMP` in ``environ`` (default: ``os.environ``) where not set;
    returns what was set. Without effect on the running process once torch is imported."""
    env = os.environ if environ is None else environ
    chosen = {k: v for k, v in POLITE_OPENMP.items() if k not in env}
    env.update(chosen)
    return chosen

