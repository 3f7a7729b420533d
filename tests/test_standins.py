"""The full-size stand-ins (bench/standins.py) store their weights keyed as the published checkpoints are — OPT's
without the `model.` prefix and without the tied `lm_head`, DeBERTa-v3's with its pretraining heads — and the
loaders (rlhf_lib/models.py) read both that layout and the one `save_pretrained` writes, to the same weights."""

import sys

import pytest
import torch

from conftest import ROOT
from rlhf_lib import models

sys.path.insert(0, str(ROOT / "bench"))
import standins  # noqa: E402


def _bin_checkpoint(directory, config, state):
    """A `.bin`-only checkpoint, as the hub serves these models (transformers 5 saves only safetensors)."""
    directory.mkdir()
    config.save_pretrained(directory)
    torch.save(state, directory / "pytorch_model.bin")
    return str(directory)


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                    vocab_size=96, max_position_embeddings=64, word_embed_proj_dim=32))


def _tiny_deberta():
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(1)
    return DebertaV2Model(DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=120, max_position_embeddings=64,
                                          relative_attention=True, position_buckets=16, pos_att_type="p2c|c2p",
                                          position_biased_input=False, type_vocab_size=0))


def test_the_opt_stand_in_is_keyed_as_facebook_opt_is():
    keys = set(standins.opt_hub_state(_tiny_opt()))
    assert "decoder.embed_tokens.weight" in keys and "decoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(k.startswith("model.") for k in keys) and "lm_head.weight" not in keys


def test_the_deberta_stand_in_carries_the_pretraining_heads_of_deberta_v3():
    keys = set(standins.deberta_hub_state(_tiny_deberta()))
    assert "deberta.embeddings.word_embeddings.weight" in keys
    assert {"mask_predictions.classifier.weight", "lm_predictions.lm_head.bias",
            "deberta.embeddings.position_embeddings.weight"} <= keys


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_the_policy_loads_from_either_layout_to_the_same_weights(layout, tmp_path):
    model = _tiny_opt()
    state = model.state_dict() if layout == "save_pretrained" else standins.opt_hub_state(model)
    loaded = models.load_causal_lm(_bin_checkpoint(tmp_path / layout, model.config, state))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.lm_head.weight, model.model.decoder.embed_tokens.weight)  # the tied head rebuilt


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_the_reward_model_loads_from_either_layout_to_the_same_weights(layout, tmp_path):
    base = _tiny_deberta()
    state = {f"deberta.{k}": v for k, v in base.state_dict().items()} if layout == "save_pretrained" \
        else standins.deberta_hub_state(base)
    loaded = models.load_reward_model(_bin_checkpoint(tmp_path / layout, base.config, state), trained=True)
    for name, tensor in base.state_dict().items():
        assert torch.equal(loaded.deberta.state_dict()[name], tensor), name
    assert loaded.classifier.out_features == 1
