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
