"""The precision plan (rlhf_lib/precision.py) on a CPU: under `run.precision = "bf16"` — the plan a GPU runs — every
training stage keeps its trained parameters in fp32 (the reward model's whole network, LoRA adapters, PPO's value
head), its frozen weights in bf16, and runs its forward passes under bf16 autocast; each records that in its
metrics. torch's CPU autocast stands in for a GPU's: the dtypes are the same, the kernels are not."""

import json

import pytest
import torch

from conftest import TEST_CONFIG
from rlhf_lib import config, models, precision
from rlhf_lib.config import DatasetSource, TinyModelSpec
from rlhf_lib.data import lake

REWARD_FUNCTION = "function:rlhf_lib.judges:rule_reward"
STEPS = {"sft": dict(max_steps=4, save_steps=4, eval_steps=4, logging_steps=2),
         "reward": dict(max_steps=4, save_steps=4, eval_steps=4, logging_steps=2),
         "dpo": dict(max_steps=2, save_steps=2, eval_steps=2, logging_steps=1),
         "ppo": dict(steps=2, save_freq=2, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_response_length=8,
                     min_response_length=4),
         "rest": dict(grow_steps=1, prompts_per_grow=4, samples_per_prompt=2, max_new_tokens=8, thresholds=[0.5],
                      max_steps=2),
         "grpo": dict(max_steps=2, save_steps=2, logging_steps=1, batch_size=4, num_generations=2,
                      max_completion_length=8),
         "rloo": dict(max_steps=2, save_steps=2, logging_steps=1, batch_size=4, num_generations=2,
                      max_completion_length=8)}


@pytest.fixture(autouse=True)
def _plan_reset():
    """A stage sets its process's plan; these stages run in the test process, which must not keep it."""
    yield
    precision._plan = None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_policy):
    root = tmp_path_factory.mktemp("precision_inputs")
    reward_base = models.prepare("tiny", TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64,
                                                       vocab_size=400, max_positions=128), "reward", root, seed=0)
    src = DatasetSource(eval_rows=8)

    def uri(kind, split):
        return lake.materialise(kind, src, split, root, seed=0, sample_rows=48)["uri"]

    # SFT's 4-bit base: bitsandbytes' CPU kernel needs input widths of whole 64-column blocks (models.py)
    nf4_base = models.prepare("tiny", TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, ffn_dim=128,
                                                    vocab_size=512, max_positions=128, pretrain_steps=5),
                              "policy", root, seed=0)
    prefs = {"train": uri("preference", "train"), "eval": uri("preference", "eval")}
    prompts = uri("prompts", "train")
    online = {"sft_model": tiny_policy, "prompts": prompts, "reward_function": REWARD_FUNCTION}
    return {"sft": {"base_model": nf4_base, "train": uri("sft", "train"), "eval": uri("sft", "eval")},
            "reward": {"base_model": reward_base, **prefs}, "dpo": {"sft_model": tiny_policy, **prefs},
            "ppo": online, "rest": online, "grpo": online, "rloo": online}


def _run_stage(stage: str, inputs: dict, tmp_path, plan: str) -> dict:
    import importlib

    raw = config.load(TEST_CONFIG).model_dump()
    raw["run"].update(wandb_mode="disabled", precision=plan)
    raw[stage].update(STEPS[stage])
    (tmp_path / "run.json").write_text(json.dumps(raw))
    argv = ["--config", str(tmp_path / "run.json"), "--output", str(tmp_path / stage)]
    argv += [a for k, v in inputs.items() for a in ("--input", f"{k}={v}")]
    module = importlib.import_module("rlhf_lib.stages.ppo.trainer" if stage == "ppo" else f"rlhf_lib.stages.{stage}")
    module.main(argv)
    return json.loads((tmp_path / stage / "result.json").read_text())


@pytest.mark.parametrize("stage", list(STEPS))
def test_under_the_bf16_plan_every_stage_trains_fp32_parameters_under_bf16_autocast(stage, inputs, tmp_path):
    recorded = _run_stage(stage, inputs[stage], tmp_path, "bf16")["metrics"]["precision"]
    assert recorded["plan"] == "bf16" and recorded["autocast"] == "bfloat16", recorded
    assert recorded["trained"] == ["float32"], recorded  # master weights, adapters, the value head: never bf16
    if stage == "reward":
        assert recorded["frozen"] == [], recorded  # trained whole
    elif stage == "sft":
        assert "uint8" in recorded["frozen"], recorded  # the NF4 base
    else:
        assert "bfloat16" in recorded["frozen"], recorded  # the frozen base under a LoRA adapter


def test_the_fp32_plan_keeps_every_weight_fp32_without_autocast(inputs, tmp_path):
    recorded = _run_stage("sft", inputs["sft"], tmp_path, "fp32")["metrics"]["precision"]
    # TRL casts a QLoRA adapter to bf16 (the QLoRA paper's choice); the plan keeps it fp32
    assert recorded == {"plan": "fp32", "trained": ["float32"], "frozen": ["float32", "uint8"], "autocast": None}


def test_a_bf16_adam_step_at_the_recipes_learning_rate_is_lost_and_an_fp32_one_is_not():
    """Why trained parameters stay fp32: at lr 2e-5 most of a bf16 weight's updates round to nothing."""
    torch.manual_seed(0)
    start = torch.randn(4096) * 0.05
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.nn.Parameter(start.to(dtype).clone())
        optimizer = torch.optim.Adam([weight], lr=2e-5)
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        moved[dtype] = float((weight.detach().float() != start.to(dtype).float()).float().mean())
    assert moved[torch.float32] > 0.99
    assert moved[torch.bfloat16] < 0.2


def test_auto_is_fp32_on_a_cpu_and_a_setting_outside_the_plans_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve("auto").name == "fp32"
    assert precision.resolve("bf16").trainer_arguments() == {"bf16": True, "fp16": False, "use_cpu": True}
    with pytest.raises(ValueError, match="run.precision"):
        precision.resolve("fp16")
    with pytest.raises(Exception, match="precision"):
        config.validate({"run": {"precision": "fp16"}})
