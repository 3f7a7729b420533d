"""How many CPU threads a stage gives torch.

Tiny models on a small machine are dominated by OpenMP synchronisation: when torch runs one thread per core and
another process holds one of those cores, every parallel region waits for the starved thread, and training
slows down ten-fold or more (measured on 2 cores). So a stage sets torch's intra-op threads to the cores that
are actually free when it starts — the cores this process may use, less those other processes are keeping busy
right now — unless `run.cpu_threads` fixes the number.
"""

from __future__ import annotations

import os
import time


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(interval: float = 0.3) -> float:
    """How many cores' worth of work the whole machine is doing now (sampled over `interval` seconds)."""
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(interval)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    return (busy / total) * (os.cpu_count() or 1) if total > 0 else 0.0


def free_threads(interval: float = 0.3) -> int:
    """Cores free to this process now: usable cores less the busy ones, at least 1."""
    return max(1, min(usable_cores(), usable_cores() - round(busy_cores(interval))))


def set_threads(configured: int) -> int:
    """Set torch's intra-op threads (`configured` > 0 fixes it, 0 measures the free cores); return the count."""
    import torch

    n = configured if configured > 0 else free_threads()
    torch.set_num_threads(n)
    return n
