"""Any dataset shape through a column mapping; a real pretrained Llama and real Alpaca data end to end."""

import json

import pytest

from conftest import SHARED, ROOT, write_config
from rlhf_lib import config, preflight
from rlhf_lib.config import ConfigError, DatasetSource
from rlhf_lib.data import lake

ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."},
          {"instruction": "Say hi.", "input": "", "output": "Hi!"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path, **data):
    raw = config.load(ROOT / "configs" / "test.toml").model_dump()
    raw["run"]["storage_root"] = str(tmp_path / "store")
    for kind, section in data.items():
        raw["data"][kind].update(section)
    return config.validate(raw)


def test_alpaca_format_feeds_sft(tmp_path):
    src = _jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    section = DatasetSource(source=src, format="alpaca", eval_rows=1)
    info = lake.materialise("sft", section, "train", tmp_path, seed=0, sample_rows=16)
    rows = list(lake.stream(info["uri"], ["question", "response"]))
    # input appended to the instruction when there is one; the held-out first row carved off.
    assert rows == [{"question": "Add the numbers.\n2 and 3", "response": "5."},
                    {"question": "Say hi.", "response": "Hi!"}]


def test_explicit_column_mapping_and_its_missing_column(tmp_path):
    src = _jsonl(tmp_path / "mine.jsonl", [{"prompt": "Q1", "answer": "A1"}, {"prompt": "Q2", "answer": "A2"}])
    section = DatasetSource(source=src, columns={"question": "prompt", "response": "answer"}, eval_rows=1)
    info = lake.materialise("sft", section, "train", tmp_path, seed=0, sample_rows=16)
    assert list(lake.stream(info["uri"], ["question", "response"])) == [{"question": "Q2", "response": "A2"}]
    cfg = _cfg(tmp_path, sft={"source": src, "columns": {"question": "prompt", "response": "reply"}, "eval_rows": 1})
    problems = preflight.check(cfg)
    assert any(p.startswith("data.sft.source") and "lacks column(s) ['reply']" in p and "data.sft.columns" in p
               for p in problems), problems


def test_format_must_fit_the_kind():
    with pytest.raises(ConfigError, match="data.preference.format = 'alpaca' does not describe preference data"):
        config.validate({"data": {"preference": {"format": "alpaca"}}})
    with pytest.raises(ConfigError, match="data.sft.columns maps \\['prompt'\\]"):
        config.validate({"data": {"sft": {"columns": {"prompt": "x"}}}})


def test_eval_source_is_used_whole_unless_capped(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ALPACA)
    held = _jsonl(tmp_path / "held.jsonl", ALPACA * 30)  # 90 rows: more than the 64 carved by default
    whole = lake.materialise("prompts", DatasetSource(source=train, eval_source=held), "eval", tmp_path, 0, 16)
    capped = lake.materialise("prompts", DatasetSource(source=train, eval_source=held, eval_rows=10), "eval",
                              tmp_path, 0, 16)
    assert (whole["rows"], capped["rows"]) == (90, 10)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(), reason="../shared (stories260K, Alpaca) absent")
def test_pretrained_llama_on_real_alpaca_end_to_end(tmp_path):
    """stories260K (a real pretrained Llama, width 172) from a local folder; SFT and RL prompts from real Alpaca
    records with `format = "alpaca"` — no hand conversion. 4-bit is off: its width fails bitsandbytes' CPU
    kernel, which `start` says (tests/test_bad_input.py)."""
    from metaflow import Runner

    alpaca = str(SHARED / "data" / "alpaca_2000.jsonl.gz")
    llama_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = write_config(tmp_path / "llama.toml", {
        "run": {"storage_root": str(tmp_path / "store"), "methods": ["ppo"]},
        "policy": {"model": str(SHARED / "models" / "stories260K")},
        "data": {"sft": {"source": alpaca, "format": "alpaca", "eval_rows": 16, "max_rows": 400},
                 "prompts": {"source": alpaca, "format": "alpaca", "eval_rows": 16, "max_rows": 200}},
        "sft": {"quantize_4bit": False, "max_steps": 10, "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                                  "target_modules": llama_modules}},
        "reward": {"max_steps": 8},
        "ppo": {"steps": 4, "save_freq": 2, "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                      "target_modules": llama_modules}},
        "eval": {"num_prompts": 8, "curve": False}})
    with Runner(str(ROOT / "flows" / "rlhf_flow.py"), show_output=False, config=[("config", str(cfg))],
                env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}) as runner:
        result = runner.run()
        assert result.status == "successful", result.stderr[-4000:]
        data = result.run.data
    assert data.datasets["sft_train"]["rows"] == 400  # max_rows after the 16 held out
    assert data.sft_metrics["steps"] == 10 and len(data.ppo_stats) == 4
    assert set(data.eval_report) == {"sft", "ppo"} and data.gold_judge == "reward_model"


@pytest.mark.parametrize("steps", [1, 2, 10, 11])
def test_a_tiny_policy_pretrains_for_any_number_of_steps(steps):
    """OneCycleLR's 10% warm-up ends at step 0 when there are exactly 10 steps and divides by zero there; a
    config with `pretrain_steps = 10` failed in `data` (found by the registry test in CI)."""
    import torch
    from transformers import OPTForCausalLM

    from rlhf_lib import models
    from rlhf_lib.config import TinyModelSpec

    spec = TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, ffn_dim=32, vocab_size=300, max_positions=32)
    tokenizer = models._train_bpe_tokenizer(["a small corpus of words", "more words here"] * 8, spec.vocab_size)
    model = OPTForCausalLM(models.tiny_policy_config(spec, len(tokenizer), tokenizer.pad_token_id,
                                                     tokenizer.bos_token_id, tokenizer.eos_token_id))
    before = [p.detach().clone() for p in model.parameters()]
    models._pretrain(model, tokenizer, ["a small corpus of words", "more words here"], steps, seed=0, batch_size=2)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
