"""The `data` step's work: materialise every dataset split as a local Deep Lake dataset."""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.config import AI_FEEDBACK, RunConfig
from rlhf_lib.data import lake

KINDS = ("sft", "preference", "prompts")


def prepare_datasets(cfg: RunConfig, root: Path) -> dict[str, dict]:
    """{"sft_train": {"uri", "rows", "columns", "source"}, "sft_eval": …, …} for every kind and split, written
    under `root/datasets`."""
    out = {}
    for kind in KINDS:
        for split in ("train", "eval"):
            if getattr(cfg.data, kind).source == AI_FEEDBACK:  # judged pairs come from the rlaif step
                out[f"{kind}_{split}"] = {"uri": None, "rows": 0, "columns": lake.SCHEMAS[kind]["required"],
                                          "source": AI_FEEDBACK}
                print(f"[data] {kind}/{split}: from AI feedback, made by the rlaif step", flush=True)
                continue
            info = lake.materialise(kind, getattr(cfg.data, kind), split, root, cfg.run.seed,
                                    cfg.data.sample_rows)
            out[f"{kind}_{split}"] = info
            print(f"[data] {kind}/{split}: {info['rows']} rows {info['columns']} from {info['source']} -> {info['uri']}",
                  flush=True)
    return out
