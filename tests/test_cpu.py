"""The CPU thread policy: a stage takes the cores that are free when it starts, or the number configured."""

import subprocess
import sys
import time

import torch

from rlhf_lib import cpu


def test_free_threads_leave_out_a_core_another_process_keeps_busy():
    usable = cpu.usable_cores()
    idle = cpu.free_threads(interval=0.5)
    assert 1 <= idle <= usable
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = cpu.free_threads(interval=1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy <= max(1, usable - 1)


def test_configured_threads_win():
    before = torch.get_num_threads()
    try:
        assert cpu.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_pods_cpu_quota_bounds_the_threads(tmp_path):
    """A 4-CPU pod on a big node: cgroup v2's cpu.max (and v1's cfs quota) bound the cores, not the node's count."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert cpu.cgroup_cpu_limit(v2) == 1.5 and cpu.usable_cores(v2) == min(2, cpu.usable_cores(tmp_path / "none"))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "v1") == 1.0 and cpu.usable_cores(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "v1") is None
