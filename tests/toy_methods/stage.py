"""A toy alignment method for tests/test_registry.py: "trains" by keeping the SFT model as it is, and writes the
result.json every method's stage writes (model path, metrics, per-step stats)."""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import toy_methods  # noqa: E402,F401  (the registry row: run.methods may name "toy")
from rlhf_lib.stages import common  # noqa: E402


def main(argv=None):
    started, args, cfg, (sft_model,), out = common.start("toy", argv, "sft_model")
    model = out / "merged"
    if not model.exists():
        shutil.copytree(sft_model, model)
    common.write_result(out, "toy", started, model_path=str(model.resolve()), adapter_path=None,
                        checkpoint_dir=None, metrics={"toy_metric": 1.0},
                        stats=[{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}], resumed_from_step=0)


if __name__ == "__main__":
    main()
