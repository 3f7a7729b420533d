"""Stage subprocesses: a failure raises StageFailed with the tail of the stage's own log."""

import json

import pytest

from rlhf_lib import config, launch
from conftest import TEST_CONFIG


def test_failed_stage_raises_with_log_tail(tmp_path):
    cfg = config.load(TEST_CONFIG)
    with pytest.raises(launch.StageFailed) as info:
        launch.launch("merge", cfg.to_json(), tmp_path / "merge", {"base_model": str(tmp_path / "nowhere")})
    err = info.value
    assert err.returncode != 0
    assert "missing --input adapter=PATH" in err.log_tail  # the stage's own message, carried up
    assert (tmp_path / "merge" / "stage.log").exists()
    assert not (tmp_path / "merge" / "result.json").exists()


def test_cpu_command_uses_one_process():
    cmd = launch.accelerate_command("sft", ["--config", "x"], num_gpus=0)
    assert cmd[cmd.index("--num_processes") + 1] == "1" and "--cpu" in cmd
    cmd = launch.accelerate_command("sft", ["--config", "x"], num_gpus=8)
    assert cmd[cmd.index("--num_processes") + 1] == "8" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"


def test_stage_runs_alone_and_writes_result(tiny_policy, tmp_path):
    """A stage is an entry point of its own: merge a (zero) adapter without Metaflow or accelerate."""
    from peft import get_peft_model

    from rlhf_lib import models
    from rlhf_lib.config import LoraSection
    from rlhf_lib.stages import merge

    get_peft_model(models.load_causal_lm(tiny_policy), models.lora_config(LoraSection(r=2, alpha=4))
                   ).save_pretrained(tmp_path / "adapter")
    (tmp_path / "run.json").write_text(config.load(TEST_CONFIG).to_json())
    merge.main(["--config", str(tmp_path / "run.json"), "--output", str(tmp_path / "out"),
                "--input", f"base_model={tiny_policy}", "--input", f"adapter={tmp_path / 'adapter'}"])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["stage"] == "merge" and "torch" in result["versions"]
    assert (tmp_path / "out" / "merged" / "model.safetensors").exists()
