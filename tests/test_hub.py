"""Models as the hub ships them, loaded safely and at one revision per run: `.bin`-only weights (single or sharded
with an index) through torch's weights-only unpickler, a pickle that would run code refused, `start` naming a
model with no weights, and a run pinned to the commit `start` saw while the hub's `main` moves."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TEST_CONFIG
from rlhf_lib import config, hub, launch, models, preflight


class RunsCode:
    """What a malicious checkpoint pickles: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bin_only(model, tokenizer, out: Path, shards: int = 1) -> Path:
    """`model` saved the way the hub serves some models: config, tokenizer and `pytorch_model.bin` (or shards and
    their index) — no safetensors (transformers 5 always writes safetensors, so the state dict goes through
    torch.save)."""
    out.mkdir(parents=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, out / hub.PICKLED)
        return out
    names = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({k: state[k] for k in part}, out / shard)
        weight_map.update({k: shard for k in part})
    (out / hub.PICKLED_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory) -> str:
    from rlhf_lib.config import TinyModelSpec

    return models.prepare("tiny", TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64,
                                                vocab_size=400, max_positions=128), "reward",
                          tmp_path_factory.mktemp("rm"), seed=0)


def test_a_reward_model_served_as_a_bin_loads_through_the_weights_only_unpickler(tiny_reward, tmp_path):
    """microsoft/deberta-v3-base as the hub serves it: config.json + pytorch_model.bin only. It loaded with
    `use_safetensors=True` before (OSError: no file named model.safetensors)."""
    original = models.load_reward_model(tiny_reward)
    served = _bin_only(original, models.load_tokenizer(tiny_reward), tmp_path / "deberta-like")
    assert not list(served.glob("*.safetensors"))
    loaded = models.load_reward_model(str(served))
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    hub.check_loadable(str(served), "reward_model.model")


def test_a_causal_lm_in_sharded_bins_with_an_index_loads(tiny_policy, tmp_path):
    original = models.load_causal_lm(tiny_policy)
    served = _bin_only(original, models.load_tokenizer(tiny_policy), tmp_path / "sharded", shards=3)
    assert len(list(served.glob("pytorch_model-*.bin"))) == 3
    loaded = models.load_causal_lm(str(served))
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
    hub.check_loadable(str(served), "policy.model")
    # Where both are there, safetensors win (the .bin is never unpickled).
    both = tmp_path / "both"
    shutil.copytree(tiny_policy, both)
    (both / hub.PICKLED).write_bytes(pickle.dumps(RunsCode()))
    assert hub.weight_files(sorted(p.name for p in both.iterdir()), both) == [hub.SAFETENSORS]
    models.load_causal_lm(str(both))


def test_a_bin_that_would_run_code_is_refused(tiny_reward, tmp_path):
    served = _bin_only(models.load_reward_model(tiny_reward), models.load_tokenizer(tiny_reward), tmp_path / "m")
    torch.save({"weights": RunsCode()}, served / hub.PICKLED)
    with pytest.raises(hub.ModelError, match="pickle that holds more than tensors: refused"):
        hub.check_loadable(str(served), "reward_model.model")
    with pytest.raises(models.ModelError, match="pickle that holds more than tensors: refused"):
        models.load_reward_model(str(served))


def test_start_names_a_model_with_a_config_but_no_weights(tiny_policy, tmp_path, monkeypatch):
    """A local directory, and a Hugging Face cache entry, holding a config.json but no weights: `start` fails in
    seconds naming the model and the key, before any stage spends its hours."""
    import time

    empty = tmp_path / "half-downloaded"
    empty.mkdir()
    shutil.copy(Path(tiny_policy) / "config.json", empty)
    cache = _cache(tmp_path / "hf", "rlhf-test/no-weights", {"a" * 40: empty})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    raw = config.load(TEST_CONFIG).model_dump()
    for ref in (str(empty), "rlhf-test/no-weights"):
        started = time.time()
        problems = preflight.check(config.validate({**raw, "policy": {**raw["policy"], "model": ref}}))
        assert time.time() - started < 30
        said = [p for p in problems if p.startswith("policy.model")]
        assert said and "has a config.json but no weights" in said[0] and ref in said[0], problems


def _cache(root: Path, repo: str, snapshots: dict[str, Path], main: str | None = None) -> Path:
    """A Hugging Face hub cache holding `snapshots` (commit -> model directory) of `repo`, `main` at one of them."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for commit, source in snapshots.items():
        shutil.copytree(source, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(main or next(iter(snapshots)))
    return root


def test_a_run_loads_the_revision_start_recorded_while_main_moves(tiny_policy, tmp_path, monkeypatch):
    """Two snapshots of one id in the cache. `start` records the commit `main` names; then a new revision is
    pushed (`main` moves); a stage given the run's pinned reference still loads the recorded commit."""
    from peft import get_peft_model

    from rlhf_lib.config import LoraSection

    first = models.load_causal_lm(tiny_policy)
    pushed = tmp_path / "pushed"
    shutil.copytree(tiny_policy, pushed)
    second = models.load_causal_lm(tiny_policy)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.5)
    second.save_pretrained(pushed, safe_serialization=True)
    a, b = "a" * 40, "b" * 40
    cache = _cache(tmp_path / "hf", "rlhf-test/tiny-opt", {a: Path(tiny_policy), b: pushed}, main=a)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    raw = config.load(TEST_CONFIG).model_dump()
    cfg = config.validate({**raw, "policy": {**raw["policy"], "model": "rlhf-test/tiny-opt"}})
    revisions = preflight.model_revisions(cfg)
    assert revisions == {"rlhf-test/tiny-opt": a}
    pinned = hub.pin("rlhf-test/tiny-opt", revisions)
    assert pinned == f"rlhf-test/tiny-opt@{a}"

    (cache / "models--rlhf-test--tiny-opt" / "refs" / "main").write_text(b)  # a revision pushed mid-run
    assert torch.equal(next(models.load_causal_lm("rlhf-test/tiny-opt").parameters()), next(second.parameters()))
    adapter = tmp_path / "adapter"
    get_peft_model(models.load_causal_lm(tiny_policy), models.lora_config(LoraSection(r=2, alpha=4))
                   ).save_pretrained(adapter)
    result = launch.launch("merge", cfg.to_json(), tmp_path / "merge", {"base_model": pinned, "adapter": str(adapter)},
                           env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    merged = models.load_causal_lm(result["merged_path"])
    # LoRA's B starts at zero: the merged model is the base it was given — the recorded commit, not the pushed one.
    assert all(torch.equal(x, y) for x, y in zip(merged.state_dict().values(), first.state_dict().values()))
    assert result["base_model"] == pinned


def test_a_model_given_as_a_path_loads_like_one_given_as_a_string(tiny_policy):
    """bench/ppo_vs_trl.py passes Paths: `hub` took `.startswith` of one (AttributeError) since model revisions."""
    from pathlib import Path

    from rlhf_lib import hub, models

    assert hub.is_local(Path(tiny_policy)) and hub.source(Path(tiny_policy)) == (tiny_policy, {})
    assert models.load_tokenizer(Path(tiny_policy)).vocab_size == models.load_tokenizer(tiny_policy).vocab_size


def test_a_reward_model_to_train_keeps_fp32_weights_where_the_device_computes_in_bf16(tiny_reward, monkeypatch):
    """On a bf16 GPU the reward model was loaded in bf16 and trained so (the trainer's bf16 flag only adds
    autocast): its updates rounded to nothing. Loaded to train, its weights are fp32 whatever the compute dtype;
    loaded to score, it takes the device's dtype."""
    import torch

    from rlhf_lib import models

    monkeypatch.setattr(models, "compute_dtype", lambda: torch.bfloat16)  # what a bf16 GPU gives
    assert {p.dtype for p in models.load_reward_model(tiny_reward, trained=True).parameters()} == {torch.float32}
    assert {p.dtype for p in models.load_reward_model(tiny_reward).parameters()} == {torch.bfloat16}
