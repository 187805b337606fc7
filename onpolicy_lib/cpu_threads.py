"""How many CPU threads torch uses and how they wait, so a step slows in proportion to the cores it gets.

torch's CPU kernels split work among OpenMP threads, one per core, that meet at a barrier after every
parallel region: a few per layer in a training step, hundreds per generated token when decoding. How a
thread waits there decides two costs:

* GNU OpenMP's own policy (torch's CPU wheels use it) spins for a long while (``GOMP_SPINCOUNT``
  300,000) before sleeping. Alone on the machine that is fastest, since decoding's regions follow one
  another within microseconds. But when another process takes one of the cores, the thread that shares
  it runs only part of the time, every region waits for it, and the spinning thread keeps its own core
  busy so the scheduler never moves the waiting one there: a step many times slower (``--busy-core``).
* A passive wait (``OMP_WAIT_POLICY=PASSIVE``) sleeps at once: beside a busy core a step degrades in
  proportion to the cores it gets, but alone every region pays a wake-up, and decoding is much slower.

So the default (``ONPOLICY_QUANT_WAIT=auto``) chooses when ``onpolicy_lib`` is imported, before torch
loads the runtime (which reads the policy once; the processes it starts, such as the sweep runner's
notebooks, inherit it): a passive wait if another process keeps one of this process's cores busy at that
moment, otherwise a *bounded* spin (:data:`SPIN_COUNT`), as fast as the long spin alone while a core
taken later costs a few times, not tens of times. ``bounded``, ``passive`` and ``runtime`` (leave the
runtime's own) force one; an OpenMP variable the user set wins over all of them. The wait policy changes
no result, only speed, so choosing it from the load is harmless; the thread count is another matter:

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
WAIT_ENV = "ONPOLICY_QUANT_WAIT"
WAIT_CHOICES = ("auto", "bounded", "passive", "runtime")
# Spins before a waiting thread sleeps: long enough that decoding alone runs as fast as with the runtime's
# 300,000, short enough that a core taken by another process costs a few times, not tens of times
# (`python -m onpolicy_lib.speed --busy-core` measures both).
SPIN_COUNT = 30_000
# Set before the OpenMP runtime loads (with torch); KMP_BLOCKTIME (milliseconds) is Intel OpenMP's analogue.
BOUNDED_SPIN = {"GOMP_SPINCOUNT": str(SPIN_COUNT), "KMP_BLOCKTIME": "1"}
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
WAIT_POLICY_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Below this 1-minute load average no other process can be keeping a core busy: skip the sampling.
IDLE_LOAD = 0.5
# A core another process keeps this busy (share of its time) while we sample is counted as taken.
TAKEN_SHARE = 0.8


def others_busy(seconds: float = 0.2) -> bool:
    """Whether another process keeps one of this process's cores busy now (instant when the machine's load
    average says it is idle; otherwise sampled over ``seconds``)."""
    try:
        if os.getloadavg()[0] < IDLE_LOAD:
            return False
    except OSError:
        pass
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return busy_cores(cpus, seconds) > 0


def set_wait_policy(environ: dict[str, str] | None = None) -> str:
    """Set the OpenMP wait policy in ``environ`` (default ``os.environ``) per ``$ONPOLICY_QUANT_WAIT`` (see the
    module's notes); returns the policy applied, or ``"user"`` where an OpenMP variable was already set."""
    env = os.environ if environ is None else environ
    choice = env.get(WAIT_ENV) or "auto"
    if choice not in WAIT_CHOICES:
        raise ValueError(f"{WAIT_ENV} accepts {', '.join(WAIT_CHOICES)}; got {choice!r}")
    if any(key in env for key in WAIT_POLICY_KEYS):
        return "user"
    if choice == "auto":
        choice = "passive" if others_busy() else "bounded"
    env.update({"bounded": BOUNDED_SPIN, "passive": PASSIVE_WAIT, "runtime": {}}[choice])
    return choice


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


def busy_seconds() -> float | None:
    """CPU seconds every process on the machine has spent busy since boot (all CPUs together); None where
    /proc/stat cannot be read. The difference over an interval, less this process's own CPU time, is what
    other processes took meanwhile."""
    times = _cpu_times()
    if times is None:
        return None
    return sum(busy for busy, _ in times.values()) / os.sysconf("SC_CLK_TCK")


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
