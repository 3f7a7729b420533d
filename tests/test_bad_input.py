"""Every bad input in docs/reliability.md's table fails before any training: non-zero exit within seconds, a message
that names the problem and the fix, and no stage output written."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_config

FLOW = str(ROOT / "flows" / "rlhf_flow.py")


def _classifier(path, num_labels, tokenizer_from):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from rlhf_lib import models

    DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32,
                                                       num_labels=num_labels)).save_pretrained(path)
    models.load_tokenizer(tokenizer_from).save_pretrained(path)
    return str(path)


def _cases(tmp, tiny_policy):
    (tmp / "no_rejected.jsonl").write_text(json.dumps({"chosen": "a", "reject": "b"}) + "\n")
    (tmp / "empty.jsonl").write_text("")
    return {
        "unknown key": ({"sft": {"lora_rank": 8}}, "unknown config key `sft.lora_rank`"),
        "wrong type": ({"ppo": {"steps": "ten"}}, "config key `ppo.steps`: Input should be a valid integer"),
        "min length > max length": ({"ppo": {"min_response_length": 64, "max_response_length": 8}},
                                    "ppo.min_response_length (64) > ppo.max_response_length (8)"),
        "missing column": ({"data": {"preference": {"source": str(tmp / "no_rejected.jsonl"), "eval_rows": 1}}},
                           "lacks column(s) ['rejected']"),
        "empty dataset": ({"data": {"sft": {"source": str(tmp / "empty.jsonl"), "eval_rows": 1}}},
                          "data.sft.source: '" + str(tmp / "empty.jsonl") + "' is empty"),
        "nonexistent dataset path": ({"data": {"prompts": {"source": str(tmp / "nope.parquet"), "eval_rows": 1}}},
                                     "does not exist; fix the path or use `sample`"),
        "nonexistent model path": ({"policy": {"model": str(tmp / "no-model")}}, "is not a model directory"),
        "hub id unreachable offline": ({"policy": {"model": "facebook/opt-1.3b"}},
                                       "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"),
        "reward model is a causal LM": ({"reward_model": {"model": tiny_policy}}, "is a causal LM"),
        "reward model has 2 labels": ({"reward_model": {"model": _classifier(tmp / "cls2", 2, tiny_policy)}},
                                      "needs num_labels=1"),
        "too little disk": ({"run": {"min_free_disk_gb": 1e9}}, "free space or point run.storage_root elsewhere"),
        "GPUs this machine lacks": ({"run": {"gpus": 1}}, "run.gpus = 1 but this machine has 0 GPU(s)"),
        "reward function that does not import": ({"reward": {"function": "no_such_module:score"}},
                                                 "reward.function: cannot import module 'no_such_module'"),
        "reward function that returns no floats": ({"reward": {"function": "os.path:basename"}},
                                                   "reward.function: 'os.path:basename' raised on a sample completion"),
        "GRPO group that does not divide the batch": ({"grpo": {"batch_size": 10, "num_generations": 4}},
                                                      "batch_size (10) must be a multiple of num_generations (4)"),
        "GRPO beta < 0": ({"grpo": {"beta": -0.1}}, "config key `grpo.beta`: Input should be greater than or equal to 0"),
        "RLOO group of one": ({"rloo": {"num_generations": 1}},
                              "config key `rloo.num_generations`: Input should be greater than or equal to 2"),
        "4-bit on CPU, width 172": ({"policy": {"tiny": {"ffn_dim": 172}}},
                                    "bitsandbytes' CPU 4-bit kernel needs every quantized layer's output width to be a "
                                    "multiple of 32"),
        # AVX512-BF16 CPUs' inference path repacks blocks of 64 input columns: width 32 failed mid-SFT there
        "4-bit on CPU, input width 32": ({"policy": {"tiny": {"hidden_size": 32}}},
                                         "and its input width a multiple of 64"),
        "unknown method": ({"run": {"methods": ["ppo", "trpo"]}}, "run.methods names unknown method(s) ['trpo']"),
        "no method": ({"run": {"methods": []}}, "run.methods is empty"),
        "ReST thresholds not increasing": ({"rest": {"thresholds": [0.7, 0.5]}},
                                           "rest.thresholds [0.7, 0.5] must be strictly increasing"),
        "DPO beta <= 0": ({"dpo": {"beta": 0.0}}, "config key `dpo.beta`: Input should be greater than 0"),
        "AI feedback without a judge": ({"data": {"preference": {"source": "ai_feedback"}}, "rlaif": {"judge_model": ""}},
                                        "needs rlaif.judge_model"),
        "constitution file missing": ({"data": {"preference": {"source": "ai_feedback"}},
                                       "rlaif": {"constitution": str(tmp / "no-such-constitution.txt")}},
                                      "rlaif.constitution: '" + str(tmp / "no-such-constitution.txt") + "' does not exist"),
    }


CASES = ["unknown key", "wrong type", "min length > max length", "missing column", "empty dataset",
         "nonexistent dataset path", "nonexistent model path", "hub id unreachable offline",
         "reward model is a causal LM", "reward model has 2 labels", "too little disk", "unknown method", "no method",
         "ReST thresholds not increasing", "DPO beta <= 0", "AI feedback without a judge", "constitution file missing",
         "4-bit on CPU, width 172", "4-bit on CPU, input width 32", "GPUs this machine lacks", "reward function that does not import",
         "reward function that returns no floats", "GRPO group that does not divide the batch", "GRPO beta < 0",
         "RLOO group of one"]


# Through the whole flow (a Metaflow run, as a user starts it): one case of each kind of check. Every case also
# runs below through `pipeline.start`, the function the `start` step calls, in-process (a flow launch costs ~15 s).
FLOW_CASES = ["unknown key", "missing column", "hub id unreachable offline", "4-bit on CPU, width 172",
              "GPUs this machine lacks", "GRPO group that does not divide the batch"]


def _bad_config(case, tmp_path, tiny_policy):
    if case == "GPUs this machine lacks" and __import__("torch").cuda.device_count():
        pytest.skip("this machine has a GPU")
    overrides, message = _cases(tmp_path, tiny_policy)[case]
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "bad.toml", {**overrides, "run": {**overrides.get("run", {}),
                                                                   "storage_root": str(store)}})
    return cfg, message, store


# huggingface_hub reads HF_HUB_OFFLINE when it is imported, which this process did long ago: that case runs in
# the flow only.
@pytest.mark.parametrize("case", [c for c in CASES if c != "hub id unreachable offline"])
def test_start_names_every_bad_input_and_writes_nothing(case, tmp_path, tiny_policy):
    import tomllib

    from rlhf_lib import pipeline

    cfg, message, store = _bad_config(case, tmp_path, tiny_policy)
    with pytest.raises(Exception) as failure:
        pipeline.start(tomllib.loads(cfg.read_text()), "local")
    text = str(failure.value) + str(getattr(failure.value, "message", ""))
    assert message in text, text[-3000:]
    assert not store.exists(), "a failed start must not write stage output"


@pytest.mark.parametrize("case", FLOW_CASES)
def test_bad_input_fails_the_flow_fast_and_writes_nothing(case, tmp_path, tiny_policy):
    cfg, message, store = _bad_config(case, tmp_path, tiny_policy)
    started = time.time()
    proc = subprocess.run([sys.executable, FLOW, "--config", "config", str(cfg), "run"], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output[-3000:]
    # The diagnosis alone: no traceback through Metaflow's CLI, no "Internal error" banner.
    assert "Traceback" not in output and "Internal error" not in output, output[-3000:]
    assert time.time() - started < 120
    assert not store.exists(), "a failed start must not write stage output"


def test_four_bit_on_a_cpu_is_checked_where_gpus_are_visible_but_run_gpus_is_0(tmp_path, tiny_policy, monkeypatch):
    """run.gpus = 0 puts every stage on the CPU even on a GPU machine; the 4-bit width check was skipped whenever
    the launching machine saw a GPU, and SFT then failed mid-stage."""
    import tomllib

    import torch

    from rlhf_lib import config, preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg, message, _ = _bad_config("4-bit on CPU, width 172", tmp_path, tiny_policy)
    run_config = config.schema().model_validate(tomllib.loads(cfg.read_text()))
    assert run_config.run.gpus == 0
    assert any(message in problem for problem in preflight.four_bit_on_cpu(run_config))
    on_gpus = run_config.model_copy(update={"run": run_config.run.model_copy(update={"gpus": 1})})
    assert preflight.four_bit_on_cpu(on_gpus) == []
