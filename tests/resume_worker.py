"""One process of a stage resuming from a checkpoint in S3 (see tests/test_resume_faults.py).

    python -m torch.distributed.run --nnodes 2 --node_rank K --nproc_per_node 2 ... tests/resume_worker.py \
        ROOT OUTPUT [FAIL_RANK]

Every process joins a gloo group as a stage's processes do, then calls `checkpoints.resume_point` on the S3 prefix
ROOT with OUTPUT as its node's stage directory. The process FAIL_RANK finds its node's copy gone before it loads
(its disk lost it). Each prints `RESUMED <rank> <step>` and exits 0, or exits non-zero with the error.
"""

import json
import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402

from rlhf_lib import checkpoints  # noqa: E402


def main() -> None:
    root, output = sys.argv[1], Path(sys.argv[2])
    fail_rank = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    timeout = int(os.environ.get("RESUME_WORKER_GROUP_TIMEOUT_S", "60"))  # as run.process_group_timeout_s
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rank = dist.get_rank()

    def load(path: Path):
        if rank == fail_rank:
            shutil.rmtree(path)  # the copy this process was to read is gone
        return json.loads((Path(path) / "state.json").read_text())

    found = checkpoints.resume_point("ppo", [root], output, load)
    print(f"RESUMED {rank} {found[1]['step'] if found else 0}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
