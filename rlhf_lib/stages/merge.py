"""Merge the SFT LoRA adapter into a full-precision base: bf16 on GPU, fp32 on CPU, never 4-bit.

    python -m rlhf_lib.stages.merge --config run.json --output DIR --input base_model=PATH_OR_ID --input adapter=DIR

Writes DIR/merged (safetensors + tokenizer), a standalone model later stages load without peft.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.stages import contract


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import models, tracking

    run = contract.start("merge", argv, "base_model", "adapter")
    base_model, adapter = run.paths
    merged = models.merge_adapter(base_model, adapter, run.out / "merged", run.cfg.run.trust_remote_code)
    if contract.is_main_process():
        with tracking.wandb_run(run.cfg, "merge") as wandb_run:
            if wandb_run is not None:
                wandb_run.summary.update({"merged_path": str(merged.resolve()), "adapter_path": adapter})
        result = contract.write_result(run, merged_path=str(merged.resolve()), base_model=base_model,
                                       adapter_path=adapter, dtype=str(models.compute_dtype()).removeprefix("torch."))
        run.say(f"merged model: {merged.resolve()}  ({result})")
    return merged


if __name__ == "__main__":
    main()
