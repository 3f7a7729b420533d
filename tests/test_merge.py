"""merge: the merged standalone model computes what the base + adapter computes."""

import torch

from rlhf_lib import models
from rlhf_lib.config import LoraSection


def test_merged_logits_equal_adapter_logits(tiny_policy, tmp_path):
    from peft import PeftModel, get_peft_model

    torch.manual_seed(0)
    base = models.load_causal_lm(tiny_policy)
    lora = models.lora_config(LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "fc1"]))
    lora.init_lora_weights = False  # random B: an adapter that really changes the output
    adapted = get_peft_model(base, lora)
    adapted.save_pretrained(tmp_path / "adapter")

    merged_dir = models.merge_adapter(tiny_policy, str(tmp_path / "adapter"), tmp_path / "merged")
    assert (merged_dir / "model.safetensors").exists() and not list(merged_dir.glob("*.bin"))
    merged = models.load_causal_lm(str(merged_dir))
    assert not any("lora" in name for name, _ in merged.named_parameters())

    fresh = PeftModel.from_pretrained(models.load_causal_lm(tiny_policy), tmp_path / "adapter").eval()
    ids = models.load_tokenizer(tiny_policy)(["Question: What is the capital of Peru?\n\nAnswer:"],
                                             return_tensors="pt")
    with torch.no_grad():
        expected = fresh(**ids).logits
        got = merged.eval()(**ids).logits
        plain = models.load_causal_lm(tiny_policy).eval()(**ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter matters...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # ...and the merge keeps it exactly
