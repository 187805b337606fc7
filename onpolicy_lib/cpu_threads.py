"""How many CPU threads torch uses and how they wait, so a step slows in proportion to the cores it gets.

torch's CPU kernels split work among OpenMP threads, one per core, that meet at a barrier after every
parallel region (hundreds per step). By default a thread that reaches a barrier first *spins* on its
core. When another process takes one of the cores, the thread that shares it runs only part of the
time, and every region waits for it; the spinning thread keeps its own core busy, so the scheduler
never moves the waiting thread there. A step then costs many times what half the machine should cost.
Two remedies, both applied by default:

* a passive wait policy: a thread at a barrier sleeps (``OMP_WAIT_POLICY=PASSIVE`` for GNU OpenMP,
  which torch's CPU wheels use; ``KMP_BLOCKTIME=0`` for Intel's). The OpenMP runtime reads it once, when
  it loads with torch, so :func:`set_wait_policy` runs when ``onpolicy_lib`` is imported (before torch),
  and the processes it starts (the sweep runner's notebooks) inherit it. A value the user set wins.
* as many threads as the cores this process may use (:func:`usable_cores`): its affinity mask
  (``taskset``, cpusets) and its cgroup CPU quota (containers), where torch's default counts every core
  of the machine. The cores other processes keep busy at start are left out only on request
  (``ONPOLICY_QUANT_THREADS=available``): the thread count can change a reduction's summation order,
  so a run's numbers would then depend on the machine's load at its start. ``ONPOLICY_QUANT_THREADS=N``
  (or ``OMP_NUM_THREADS``) sets it.

``python -m onpolicy_lib.speed --busy-core`` measures both against a deliberately busy core.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

THREADS_ENV = "ONPOLICY_QUANT_THREADS"
WAIT_ENV = "ONPOLICY_QUANT_WAIT"  # "runtime": leave the OpenMP runtime's own wait policy (spinning) in place
# Set before the OpenMP runtime loads (with torch): threads that wait at a barrier sleep instead of spinning.
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# A core another process keeps this busy (share of its time) while we sample is counted as taken.
TAKEN_SHARE = 0.8


def set_wait_policy(environ: dict[str, str] | None = None) -> None:
    """The passive wait policy in ``environ`` (default ``os.environ``), where the user set none (and did not
    ask for the runtime's own with ``ONPOLICY_QUANT_WAIT=runtime``)."""
    env = os.environ if environ is None else environ
    if env.get(WAIT_ENV) == "runtime":
        return
    for key, value in PASSIVE_WAIT.items():
        env.setdefault(key, value)


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """Per CPU: (busy, total) jiffies from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def busy_cores(cpus: set[int], seconds: float = 0.3) -> int:
    """How many of ``cpus`` other processes keep busy (at least :data:`TAKEN_SHARE` of the time) over
    ``seconds``, while this process waits (so their busy time is not ours)."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None:
        return 0
    taken = 0
    for cpu in cpus:
        if cpu in before and cpu in after:
            busy, total = (after[cpu][0] - before[cpu][0]), (after[cpu][1] - before[cpu][1])
            taken += total > 0 and busy / total >= TAKEN_SHARE
    return taken


def quota_cores() -> float | None:
    """The cgroup (v2) CPU quota in cores, or None when there is none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def usable_cores(measure_load: bool = False) -> int:
    """Cores this process can use now: its affinity mask, within its CPU quota, less those other processes
    keep busy (``measure_load``), at least one."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = len(cpus)
    quota = quota_cores()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    if measure_load:
        cores -= busy_cores(cpus)
    return max(1, cores)


def configure_threads() -> int:
    """Set torch's thread count for this process (:func:`usable_cores`; ``$ONPOLICY_QUANT_THREADS``: a number,
    or ``available`` to leave out the cores busy at start; ``OMP_NUM_THREADS``'s is left as set); returns it."""
    import torch

    forced = os.environ.get(THREADS_ENV, "")
    if forced.isdigit() and int(forced) > 0:
        threads = int(forced)
    elif forced and forced != "available":
        raise ValueError(f"{THREADS_ENV} must be a positive number of threads or 'available', got {forced!r}")
    elif os.environ.get("OMP_NUM_THREADS") and not forced:
        return torch.get_num_threads()
    else:
        threads = usable_cores(measure_load=forced == "available")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
