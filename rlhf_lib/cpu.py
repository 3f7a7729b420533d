"""How many CPU threads a stage gives torch.

Tiny models on a small machine are dominated by OpenMP synchronisation: when torch runs one thread per core and
another process holds one of those cores, every parallel region waits for the starved thread, and training
slows down ten-fold or more (measured on 2 cores). So a stage sets torch's intra-op threads to the cores that
are actually free when it starts — the cores this process may use, less those other processes are keeping busy
right now — unless `run.cpu_threads` fixes the number.

In a pod the cores it may use are its CPU quota (the cgroup's `cpu.max`, or `cpu.cfs_quota_us` under cgroup v1),
not the node's: a 4-CPU pod on a 96-core node sees 96 cores in its affinity mask and /proc/stat, and 96 threads
on a 4-CPU quota are throttled most of the time. The node's other pods' load is not this pod's to avoid.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPUs this process's cgroup may use (quota / period), None when it has no quota: cgroup v2 `cpu.max`
    (`max 100000` or `400000 100000`), else v1 `cpu/cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`."""
    try:
        quota, _, period = (Path(root) / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (OSError, ValueError):
        pass
    for v1 in (Path(root) / "cpu", Path(root) / "cpu,cpuacct"):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def usable_cores(cgroup_root: Path = CGROUP) -> int:
    """Cores this process may run on: its CPU affinity (which containers and taskset narrow), and no more than
    its cgroup's CPU quota (a pod's CPU limit), rounded up."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    return max(1, min(affinity, math.ceil(limit))) if limit else affinity


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
    """Set torch's intra-op threads (`configured` > 0 fixes it; 0: the CPU quota in a pod that has one, else the
    free cores); return the count."""
    import torch

    limit = cgroup_cpu_limit()
    n = configured if configured > 0 else (usable_cores() if limit else free_threads())
    torch.set_num_threads(n)
    return n


def describe() -> str:
    """This machine in one line, for benchmark records: architecture, CPU model, usable cores, the vector
    instruction set torch's kernels use (AVX2, AVX512, ...: it decides the order floats are summed in, so figures
    match to the digit only between machines that report the same), and memory."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "memory unknown"
    return (f"{platform.machine()}, {model}, {usable_cores()} cores, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {memory}, GPUs: {torch.cuda.device_count()}")
