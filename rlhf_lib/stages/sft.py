"""Supervised fine-tuning with QLoRA (TRL SFTTrainer): the seed's `Question: …\\n\\nAnswer: …` format,
LoRA r=16 α=32 dropout 0.05 on an NF4 double-quantized base, packing, cosine schedule, checkpoints.

    python -m rlhf_lib.stages.sft --config run.json --output DIR \\
        --input base_model=PATH_OR_ID --input train=LAKE_URI --input eval=LAKE_URI

Writes DIR/adapter (the LoRA adapter + tokenizer), DIR/checkpoints (HF Trainer checkpoints; a rerun with the
same DIR resumes from the newest), and DIR/result.json.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhf_lib import precision
from rlhf_lib.stages import contract, hf


def setup_datasets(cfg, train_uri: str, eval_uri: str):
    from rlhf_lib.data import formatting, lake

    fmt = cfg.data.prompt_format  # a string in the closure: `datasets` pickles it to fingerprint the map, and the
    # run config's class is built at run time (it does not pickle by name)

    def to_text(row):
        return {"text": formatting.sft_text(row, fmt)}

    cols = ["question", "response"]  # system_prompt is not used by the seed's format: don't decode it
    bs = cfg.data.stream_batch_size
    return (lake.to_hf_dataset(train_uri, cols, bs, to_text), lake.to_hf_dataset(eval_uri, cols, bs, to_text))


def setup_model(cfg, base_model: str):
    import torch

    from rlhf_lib import models

    device_map = None
    if torch.cuda.is_available():  # one full copy per accelerate process, on that process's GPU
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    model = models.load_causal_lm(base_model, quantize_4bit=cfg.sft.quantize_4bit,
                                  trust_remote_code=cfg.run.trust_remote_code, device_map=device_map)
    if cfg.sft.quantize_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def setup_trainer(run: contract.StageRun, base_model: str, train_uri: str, eval_uri: str):
    from trl import SFTConfig, SFTTrainer

    from rlhf_lib import models

    cfg, s = run.cfg, run.cfg.sft
    tokenizer = models.load_tokenizer(base_model, cfg.run.trust_remote_code, padding_side="right")
    train_ds, eval_ds = setup_datasets(cfg, train_uri, eval_uri)
    model = setup_model(cfg, base_model)
    max_length = min(s.max_length, getattr(model.config, "max_position_embeddings", s.max_length))
    # "wrapped" packing is the seed's ConstantLengthDataset; "bfd" would need a padding-free attention kernel.
    sft_args = SFTConfig(**hf.training_kwargs(cfg, s, "sft", run.out), max_length=max_length, packing=s.packing,
                         packing_strategy="wrapped", dataset_text_field="text")
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=models.lora_config(s.lora))
    return trainer, tokenizer


def main(argv: list[str] | None = None) -> Path:
    run = contract.start("sft", argv, "base_model", "train", "eval")
    base_model, train_uri, eval_uri = run.paths
    trainer, tokenizer = setup_trainer(run, base_model, train_uri, eval_uri)
    train_out, resume = hf.train_resumable(trainer, "sft", run.args.resume_from, run.out, run.args.checkpoint_uri)
    eval_metrics = trainer.evaluate()

    adapter_dir = run.out / "adapter"  # adapter weights only (safetensors) + adapter_config.json
    if not hf.save_trained(trainer, tokenizer, adapter_dir):
        return adapter_dir
    eval_loss = eval_metrics.get("eval_loss")
    metrics = {"train_loss": train_out.training_loss, "eval_loss": eval_loss,
               "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
               "steps": trainer.state.global_step, "curves": hf.log_history_summary(trainer.state.log_history),
               "precision": precision.record(trainer.model)}
    result = contract.write_result(run, adapter_path=str(adapter_dir.resolve()),
                                   checkpoint_dir=str((run.out / "checkpoints").resolve()), base_model=base_model,
                                   metrics=metrics, resumed_from=resume)
    run.say(f"adapter: {adapter_dir.resolve()}  eval_loss={eval_loss:.4f}  ({result})")
    return adapter_dir


if __name__ == "__main__":
    main()
