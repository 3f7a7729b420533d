"""Models and tokenizers: from a hub id, a local directory, or a tiny spec built (once) from config.

The tiny profile builds its models locally so the whole chain runs offline: a tiny OPT policy (the seed's
architecture) with a byte-level BPE tokenizer trained on the project's sample text and briefly pretrained so
that SFT starts from a language model, and a tiny DeBERTa-v2 reward model with its own WordPiece tokenizer, so
the policy→reward re-tokenisation path of the real recipe runs here too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from rlhf_lib import hub
from rlhf_lib.config import LoraSection, TinyModelSpec
from rlhf_lib.storage import atomic_dir

TINY = hub.TINY
ModelError = hub.ModelError


def _done(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def compute_dtype() -> torch.dtype:
    """The dtype of weights nobody trains, from this process's precision plan (`rlhf_lib/precision.py`): bf16 under
    the bf16 plan (a GPU's `auto`), else fp32."""
    from rlhf_lib import precision

    return precision.current().dtype("frozen")


def _spec_hash(kind: str, spec: TinyModelSpec, seed: int) -> str:
    """Keys a cached tiny model by its spec and seed, and by the code that builds it (this module) and the
    sample text its tokenizer and warm-up come from: a change to either must not reuse a stale model."""
    from rlhf_lib.data import sample

    h = hashlib.sha256(json.dumps([kind, spec.model_dump(), seed], sort_keys=True).encode())
    h.update(Path(sample.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:10]


def _atomic_dir(final: Path, build) -> Path:
    """Build a model directory atomically; a crash leaves no half-built model behind."""
    return atomic_dir(final, build, is_complete=_done)


# ------------------------------------------------------------------ tiny policy (OPT)


def _train_bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def tiny_policy_config(spec: TinyModelSpec, vocab_size: int | None = None, pad_token_id: int = 0,
                       bos_token_id: int = 1, eos_token_id: int = 1):
    """The tiny OPT's architecture (the vocabulary size is the trained tokenizer's; spec.vocab_size before)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=vocab_size or spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, ffn_dim=spec.ffn_dim, max_position_embeddings=spec.max_positions,
        word_embed_proj_dim=spec.hidden_size, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, dropout=0.0,
    )


def build_tiny_policy(out: Path, spec: TinyModelSpec, seed: int) -> None:
    from transformers import OPTForCausalLM

    from rlhf_lib.data import sample

    torch.manual_seed(seed)
    corpus = list(sample.pretraining_text(4000, seed))
    tokenizer = _train_bpe_tokenizer(corpus + [q + " " + a for q, a in sample._facts()], spec.vocab_size)
    config = tiny_policy_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                tokenizer.eos_token_id)
    model = OPTForCausalLM(config)
    _pretrain(model, tokenizer, corpus, spec.pretrain_steps, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def _pretrain(model, tokenizer, corpus: list[str], steps: int, seed: int, batch_size: int = 16) -> None:
    """A short full-parameter causal-LM warm-up, so the tiny policy is a (small) pretrained LM like OPT."""
    if steps == 0:
        return
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # A 10% warm-up; below 11 steps OneCycleLR's warm-up phase would end at step 0 and divide by zero (steps == 10),
    # so a warm-up shorter than one step is asked for instead.
    pct_start = 0.1 if steps > 10 else 0.5 / steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=pct_start)
    model.train()
    for _ in tqdm(range(steps), desc="pretraining tiny policy", mininterval=5):
        idx = torch.randint(len(corpus), (batch_size,), generator=gen).tolist()
        texts = [corpus[i] + tokenizer.eos_token for i in idx]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()


# ------------------------------------------------------------------ tiny reward model (DeBERTa-v2)


def _train_wordpiece_tokenizer(texts: list[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer whose vocabulary is built deterministically: specials, every character
    (alone and as a `##` continuation), then whole words by descending frequency (ties alphabetical).
    tokenizers' own WordPieceTrainer breaks frequency ties differently from process to process, which made
    the tiny reward model — and every figure downstream of it — change from one build to the next."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = specials + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in vocab]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    # BERT-style tokenizers have no EOS; RewardTrainer wants one, and SEP is what ends a sequence here.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")


def build_tiny_reward_model(out: Path, spec: TinyModelSpec, seed: int) -> None:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from rlhf_lib.data import sample

    torch.manual_seed(seed)
    tokenizer = _train_wordpiece_tokenizer(list(sample.pretraining_text(4000, seed + 1)), spec.vocab_size)
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, intermediate_size=spec.ffn_dim,
        max_position_embeddings=spec.max_positions, type_vocab_size=0, pad_token_id=tokenizer.pad_token_id,
        # DeBERTa-v3's attention: disentangled relative positions, no absolute position embeddings.
        relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
        position_buckets=64, norm_rel_ebd="layer_norm", share_att_key=True, num_labels=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    DebertaV2ForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------ resolving and loading


def prepare(ref: str, spec: TinyModelSpec, role: str, storage_root: Path, seed: int) -> str:
    """A loadable reference for a configured model: builds and caches `tiny` models, passes others through."""
    if ref != TINY:
        return ref
    builder = {"policy": build_tiny_policy, "reward": build_tiny_reward_model}[role]
    out = storage_root / "models" / f"tiny-{role}-{_spec_hash(role, spec, seed)}"
    _atomic_dir(out, lambda tmp: builder(tmp, spec, seed))
    return str(out)


def load_tokenizer(ref: str, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    name, pinned = hub.source(ref)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **pinned)
    if tok.pad_token is None:  # OPT has one; Llama-style tokenizers don't
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token
    tok.padding_side = padding_side
    return tok


def bnb_4bit_config():
    """The seed's QLoRA quantization: NF4, double quantization, bf16 compute (fp32 on CPU)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype())


def lora_config(lora: LoraSection, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type=task_type)


def attach_lora(model, lora: LoraSection):
    """`model` with a fresh LoRA adapter (a PeftModel), for the loops written here (PPO, ReST). TRL's trainers are
    given `lora_config` and attach it themselves: handed a PeftModel they would treat its adapter as pretrained and
    keep a copy of it as the reference, where the reference here is the adapter switched off."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_weights(adapter_dir: str | Path) -> dict:
    """The tensors of a saved LoRA adapter (safetensors: no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))


def restore_adapter(peft_model, weights: dict) -> None:
    """Put saved adapter tensors (`adapter_weights`) back into a PeftModel's adapter."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, weights)


def stage_device() -> torch.device:
    """The device this stage process computes on: its own GPU (accelerate's LOCAL_RANK; the one GPU of the
    single-process stages merge, rlaif and evaluate) when it has one, else the CPU. With `run.gpus = 0` the launcher
    hides every GPU from the stage, so this is the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def policy_on_device(ref: str, trust_remote_code: bool = False, padding_side: str = "left", device=None):
    """(causal LM in eval mode on this stage's device, its tokenizer): how every stage that samples, scores or
    fine-tunes a policy loads one, so all of them put it on the same device with the same dtype."""
    model = load_causal_lm(ref, trust_remote_code=trust_remote_code).to(device or stage_device()).eval()
    return model, load_tokenizer(ref, trust_remote_code, padding_side=padding_side)


def reward_model_on_device(ref: str, trust_remote_code: bool = False, device=None):
    """(reward model in eval mode, frozen, on this stage's device, its own right-padding tokenizer)."""
    model = load_reward_model(ref, trust_remote_code).to(device or stage_device()).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(ref, trust_remote_code, padding_side="right")


def _from_pretrained(model_class, ref: str, **kwargs):
    """`model_class.from_pretrained` on a reference (a path, or a hub id at its pinned commit): safetensors where
    there are any, else `.bin` through torch's weights-only unpickler — a pickle holding more than tensors is
    refused with a ModelError saying so."""
    import pickle

    name, pinned = hub.source(ref)
    try:
        return model_class.from_pretrained(name, use_safetensors=None, weights_only=True, **pinned, **kwargs)
    except pickle.UnpicklingError as err:
        raise ModelError(f"{ref}: its weights are a pickle that holds more than tensors: refused, it would run code "
                         f"when loaded ({str(err).splitlines()[0][:200]}). Convert the model to safetensors, or get it "
                         f"from a source you trust") from None


def load_causal_lm(ref: str, quantize_4bit: bool = False, trust_remote_code: bool = False, device_map=None):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=compute_dtype(), trust_remote_code=trust_remote_code)
    if quantize_4bit:
        kwargs["quantization_config"] = bnb_4bit_config()
    if device_map is not None:
        kwargs["device_map"] = device_map
    return _from_pretrained(AutoModelForCausalLM, ref, **kwargs)


def load_reward_model(ref: str, trust_remote_code: bool = False, num_labels: int = 1, trained: bool = False):
    """A reward model to score with (in the device's compute dtype), or — `trained` — to fine-tune whole: then in
    fp32, the master weights the trainer's bf16 autocast computes from on a GPU. In bf16 weights an Adam step at
    the recipe's 2e-5 falls far below a weight's spacing (a weight of 0.05 moves in steps of ~2.4e-4): most
    updates would round to nothing and the reward model would barely learn."""
    from transformers import AutoModelForSequenceClassification

    return _from_pretrained(AutoModelForSequenceClassification, ref, num_labels=num_labels,
                            dtype=torch.float32 if trained else compute_dtype(), trust_remote_code=trust_remote_code)


def load_config(ref: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    name, pinned = hub.source(ref)
    return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **pinned)


def merge_adapter(base_ref: str, adapter_dir: str, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into a full-precision base (bf16 on GPU, fp32 on CPU) — never into a 4-bit model,
    whose rounding would be baked into the merged weights. Saved as safetensors with the tokenizer, atomically."""
    from peft import PeftModel

    from rlhf_lib.progress import Progress

    def build(tmp: Path) -> None:
        phases = Progress("merge", 3, unit="phase", record=False)  # load, merge, save: the ETA from their pace
        base = load_causal_lm(base_ref, quantize_4bit=False, trust_remote_code=trust_remote_code).to(stage_device())
        phases.advance()
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        phases.advance()
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_ref,
                       trust_remote_code).save_pretrained(tmp)
        phases.advance()

    return _atomic_dir(Path(out_dir), build)


# bitsandbytes' CPU 4-bit kernel packs a weight's output rows in blocks of 32 and its input columns in pairs
# ("N must be divisible by block_n"); on a CPU with AVX512-BF16 its inference path (eval, no grad) also repacks each
# row's quantization blocks of 64 input columns, and a layer narrower than one block fails there
# ("shape '[32, 0]' is invalid", bitsandbytes 0.49, measured on this project's AVX-512 days). On a GPU any width works.
BNB_CPU_BLOCK_N = 32
BNB_QUANT_BLOCK = 64


def layers_4bit_cpu_cannot_run(config) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every layer 4-bit quantization would touch (each Linear but the
    output head) that bitsandbytes' CPU kernel cannot run. Built on the meta device: nothing is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head
            and (m.out_features % BNB_CPU_BLOCK_N or m.in_features % BNB_QUANT_BLOCK)]
