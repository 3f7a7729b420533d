"""Full-size stand-ins of the seed's models, made offline: `facebook/opt-1.3b` and `microsoft/deberta-v3-base` with
their published architectures and random weights, tokenizers of the same kind and vocabulary size trained here, and
stored as the hub serves them — `pytorch_model.bin` (fp16), no safetensors — in a Hugging Face cache under the real
ids, so the unchanged ids of configs/opt-1.3b.toml resolve with HF_HUB_OFFLINE=1, as they do on a user's machine
after `hf download`.

    python bench/standins.py CACHE_DIR          # then: HF_HUB_CACHE=CACHE_DIR HF_HUB_OFFLINE=1 ...

- facebook/opt-1.3b: OPT, hidden 2048, 24 layers, 32 heads, FFN 8192, vocabulary 50272 (byte-level BPE tokenizer of
  50265 tokens: vocab.json + merges.txt, as GPT-2's), 2048 positions; 1.316 B parameters.
- microsoft/deberta-v3-base: DeBERTa-v2 code, hidden 768, 12 layers, 12 heads, FFN 3072, vocabulary 128100
  (SentencePiece unigram model of 128000 pieces: spm.model), relative attention with 256 position buckets, no
  absolute positions; the base model only (the reward stage adds the one-label head), 184 M parameters.

Their weight files carry the keys the published checkpoints carry, not the ones `save_pretrained` writes today
(`opt_hub_state`, `deberta_hub_state` say which and where that is known from), so loading takes the same path it
takes on the real files: a base-model prefix to add, a tied head to rebuild, pretraining heads to drop.

The tokenizers learn from the project's sample text and a synthetic vocabulary large enough to reach the sizes;
the weights are random (seeded): the rehearsal measures time, memory and sizes, not quality.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The published configurations (https://huggingface.co/facebook/opt-1.3b, .../microsoft/deberta-v3-base).
OPT_1_3B = {
    "_name_or_path": "facebook/opt-1.3b", "activation_dropout": 0.0, "activation_function": "relu",
    "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True,
    "dropout": 0.1, "enable_bias": True, "eos_token_id": 2, "ffn_dim": 8192, "hidden_size": 2048, "init_std": 0.02,
    "layer_norm_elementwise_affine": True, "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt",
    "num_attention_heads": 32, "num_hidden_layers": 24, "pad_token_id": 1, "prefix": "</s>",
    "torch_dtype": "float16", "use_cache": True, "vocab_size": 50272, "word_embed_proj_dim": 2048}
DEBERTA_V3_BASE = {
    "model_type": "deberta-v2", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
    "share_att_key": True, "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7, "max_relative_positions": -1,
    "position_biased_input": False, "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 0,
    "vocab_size": 128100}
OPT_VOCAB, SPM_PIECES = 50265, 128000
IDS = {"policy": "facebook/opt-1.3b", "reward": "microsoft/deberta-v3-base"}
# `tiny`: the same ids, files and key layouts at a few MB (widths bitsandbytes' CPU 4-bit kernel takes), so that
# the rehearsal's own machinery runs in a test (tests/test_rehearsal.py); the published ones are `full`.
SIZES = {
    "full": {"policy": OPT_1_3B, "reward": DEBERTA_V3_BASE, "opt_vocab": OPT_VOCAB, "spm_pieces": SPM_PIECES,
             "corpus": (25000, 60000, 100000, 400000)},
    "tiny": {"policy": {**OPT_1_3B, "hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 256,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512,
                        "vocab_size": 1207},
             "reward": {**DEBERTA_V3_BASE, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "position_buckets": 32, "vocab_size": 1100},
             "opt_vocab": 1200, "spm_pieces": 1000, "corpus": (2000, 3000, 4000, 8000)},
}


def commit_of(repo: str, size: str = "full") -> str:
    """A fixed commit id for a stand-in (the cache's snapshot name): 40 hex digits, as the hub's are."""
    return hashlib.sha1(f"rlhf-flow stand-in of {repo}, v2 (hub keys){'' if size == 'full' else ', ' + size}"
                        .encode()).hexdigest()


def _words(n: int, seed: int) -> list[str]:
    """`n` synthetic words with English-like letter frequencies: enough distinct text for the tokenizers to reach
    their published vocabulary sizes (the sample text alone has a few thousand words)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
               1.0, 0.8, 0.2, 0.2, 0.1, 0.07]
    return ["".join(rng.choices(letters, weights, k=rng.randint(3, 9))) for _ in range(n)]


def _corpus(sentences: int, words: list[str]) -> list[str]:
    from rlhf_lib.data import sample

    text = list(sample.pretraining_text(4000, 0))
    return text + [" ".join(words[(i * 16 + j) % len(words)] for j in range(16)) for i in range(sentences)]


def opt_tokenizer(out: Path, vocab: int = OPT_VOCAB, corpus: tuple = SIZES["full"]["corpus"]) -> None:
    """A byte-level BPE tokenizer of 50265 tokens saved as GPT-2/OPT's are (vocab.json, merges.txt): <s>, <pad>,
    </s>, <unk> first (ids 0-3), </s> as bos and eos, a bos added in front as OPT's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(corpus[0], _words(corpus[1], 1)), trainer)
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    tok.model.save(str(out))  # vocab.json, merges.txt
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False, "errors": "replace",
        "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>",
        "model_max_length": 1000000000000000019884624838656}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "</s>",
                                                            "pad_token": "<pad>", "unk_token": "</s>"}))


def deberta_tokenizer(out: Path, pieces: int = SPM_PIECES, corpus: tuple = SIZES["full"]["corpus"]) -> None:
    """A SentencePiece unigram model of 128000 pieces (spm.model) with DeBERTa-v3's specials: [PAD] 0, [CLS] 1,
    [SEP] 2, [UNK] 3, and [MASK]."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(corpus[2], _words(corpus[3], 2))), model_writer=model, vocab_size=pieces,
        model_type="unigram", shuffle_input_sentence=False, character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"], minloglevel=2, num_threads=2, max_sentencepiece_length=16,
        seed_sentencepiece_size=1000000, input_sentence_size=200000, hard_vocab_limit=pieces >= SPM_PIECES)
    (out / "spm.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))


def _save_bin(state: dict, out: Path) -> None:
    """The state dict as the hub serves these models: one fp16 `pytorch_model.bin` (torch.save), no safetensors."""
    import torch

    torch.save({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()},
               out / "pytorch_model.bin")


def opt_hub_state(model) -> dict:
    """An OPTForCausalLM's state dict keyed as facebook/opt-*'s `pytorch_model.bin` is: the checkpoints were
    converted from metaseq by saving the base `OPTModel`, so every key starts at `decoder.` (no `model.` prefix),
    and there is no `lm_head.weight` — the head is tied to `decoder.embed_tokens.weight` and rebuilt from it on
    load. (transformers' convert_opt_original_pytorch_checkpoint_to_pytorch.py saves an OPTModel; loaders that read
    these files key by key, e.g. pytorch/PiPPy#779 "Load lm_head from decoder.embed_tokens.weight", meet exactly
    this layout.)"""
    return {k.removeprefix("model."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}


# The pretraining heads microsoft/deberta-v3-base's `pytorch_model.bin` carries besides `deberta.*`: the replaced
# token detection discriminator's and the MLM head's, and an absolute position table its config does not use
# (position_biased_input = false). Known from the warning every load of it for classification prints ("Some weights
# of the model checkpoint at microsoft/deberta-v3-base were not used when initializing
# DebertaV2ForSequenceClassification: ['mask_predictions.classifier.bias', ..., 'lm_predictions.lm_head.bias',
# ..., 'deberta.embeddings.position_embeddings.weight']"), quoted in many public logs and tutorials.
DEBERTA_PRETRAINING_HEADS = ("mask_predictions.dense", "mask_predictions.LayerNorm", "lm_predictions.lm_head.dense",
                             "lm_predictions.lm_head.LayerNorm")


def deberta_hub_state(model, seed: int = 1) -> dict:
    """A DebertaV2Model's state dict keyed as microsoft/deberta-v3-*'s `pytorch_model.bin` is: the base model under
    `deberta.`, plus the pretraining heads (random here) that a sequence classifier does not use."""
    import torch

    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    state = {f"deberta.{k}": v for k, v in model.state_dict().items()}
    for head in DEBERTA_PRETRAINING_HEADS:
        shape = (hidden, hidden) if head.endswith("dense") else (hidden,)
        state[f"{head}.weight"] = torch.randn(shape, generator=g) * 0.02
        state[f"{head}.bias"] = torch.zeros(hidden)
    state["mask_predictions.classifier.weight"] = torch.randn((1, hidden), generator=g) * 0.02
    state["mask_predictions.classifier.bias"] = torch.zeros(1)
    state["lm_predictions.lm_head.bias"] = torch.zeros(vocab)
    state["deberta.embeddings.position_embeddings.weight"] = torch.randn(
        (model.config.max_position_embeddings, hidden), generator=g) * 0.02
    return state


def opt_1_3b(out: Path, size: str = "full") -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(**{k: v for k, v in SIZES[size]["policy"].items() if not k.startswith("_")})
    model = OPTForCausalLM(config)
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _save_bin(opt_hub_state(model), out)
    opt_tokenizer(out, SIZES[size]["opt_vocab"], SIZES[size]["corpus"])


def deberta_v3_base(out: Path, size: str = "full") -> None:
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(1)
    config = DebertaV2Config(**{k: v for k, v in SIZES[size]["reward"].items() if k != "model_type"})
    model = DebertaV2Model(config)
    config.save_pretrained(out)
    _save_bin(deberta_hub_state(model), out)
    deberta_tokenizer(out, SIZES[size]["spm_pieces"], SIZES[size]["corpus"])


BUILDERS = {"policy": opt_1_3b, "reward": deberta_v3_base}


def build(cache: Path, roles=("policy", "reward"), size: str = "full") -> dict[str, str]:
    """The stand-ins in the Hugging Face cache `cache` (skipped where already complete): {hub id: commit}."""
    import shutil

    built = {}
    for role in roles:
        repo, commit = IDS[role], commit_of(IDS[role], size)
        repo_dir = Path(cache) / ("models--" + repo.replace("/", "--"))
        snapshot = repo_dir / "snapshots" / commit
        if not (snapshot / "pytorch_model.bin").exists():
            tmp = snapshot.with_name(f".tmp-{commit}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            print(f"[standins] building {repo} (random weights, published architecture) ...", flush=True)
            BUILDERS[role](tmp, size)
            tmp.rename(snapshot)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        built[repo] = commit
        print(f"[standins] {repo} at {commit}: {snapshot}", flush=True)
    return built


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "artifacts" / "standins" / "hub")
