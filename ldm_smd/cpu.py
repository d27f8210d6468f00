"""CPU threads on a shared machine: the OpenMP wait policy, set before torch is imported.

PyTorch's CPU kernels run on an OpenMP team of one thread per core. By default a thread that
finishes its share of a kernel spins, waiting for the others, before it sleeps. When another
process is busy on one of the cores, the thread that shares that core is descheduled while its
team-mates spin on the other cores for it: on two cores with one other single-threaded job, the
demo's stage 1 went from 38 s to 1,497 s. With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread
sleeps at once, so a busy core costs about its share; on a quiet machine the cost should be
small (a wake-up instead of a spin at each kernel; not measured here, there was none).

Measured with ``scripts/bench_shared_cpu.py`` (the demo's stage 1, 30 steps (run 2: 20),
seconds a step after the first, on 2 cores shared with other people's jobs; on a quiet machine
the whole 500-step stage took 38 s)::

    other load on the machine            default  passive | + one busy loop: default  passive
    one single-threaded job (load ~1.2)     4.64     0.29 |                    3.43     0.62
    several jobs (load 4 to 8), run 1       4.01     0.75 |                   11.41     0.64
    several jobs (load 4 to 8), run 2       5.06     0.45 |                    3.74     0.42

One thread instead of two (run 1's conditions) was 0.26 to 0.35 s and 0.70 s beside the busy
loop: no better than two passive threads on a busy machine, and it would halve a quiet one, so
the number of threads stays torch's (one per core, or ``OMP_NUM_THREADS``).

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

