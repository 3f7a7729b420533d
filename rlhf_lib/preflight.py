"""Checks the `start` step runs in seconds, before any training: everything that would otherwise fail an hour in.

Each failure raises PreflightError with one line per problem, naming the config key and the fix.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf_lib.config import AI_FEEDBACK, RunConfig
from rlhf_lib.data import lake
from rlhf_lib.data.ingest import KINDS


class PreflightError(ValueError):
    """Every problem `check` found, one line each (`problems`)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the run cannot start:\n  " + "\n  ".join(problems))


def _check_source(key: str, source: str, kind: str, mapping: dict[str, list[str]] | None = None) -> str | None:
    if source == "sample" or (kind == "preference" and source == AI_FEEDBACK):
        return None
    skind = lake.source_kind(source)
    if skind != "remote_lake" and not lake._local_path(source).exists():
        return f"{key}: {source!r} does not exist; fix the path or use `sample`"
    try:
        columns = lake.source_columns(source)
    except Exception as err:
        return f"{key}: cannot read {source!r}: {err}"
    if not columns:
        return f"{key}: {source!r} is empty; point it at a dataset with rows"
    mapping = mapping or lake.column_map(kind)
    required = lake.SCHEMAS[kind]["required"]
    missing = [mapping[c][0] for c in required if mapping[c][0] not in columns]
    if missing:
        mapped = {c: mapping[c][0] for c in required if mapping[c][0] != c}
        how = f" (mapped as {mapped} by data.{kind}.format/columns)" if mapped else ""
        return (f"{key}: {source!r} lacks column(s) {missing}{how} (has {columns}); a {kind} dataset needs "
                f"{required}: set data.{kind}.format or map them with data.{kind}.columns")
    return None


def _check_reward_model_config(ref: str, trust_remote_code: bool) -> str | None:
    """A reward model must be a sequence classifier with one label (or a base model we give one label)."""
    if ref == "tiny":
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as err:
        return f"reward_model.model: cannot read config of {ref!r}: {err}"
    archs = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return (f"reward_model.model: {ref!r} is a causal LM ({archs[0]}); use an encoder/sequence classifier "
                "such as microsoft/deberta-v3-base")
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        return (f"reward_model.model: {ref!r} is a classifier with {config.num_labels} labels; a reward model "
                "needs num_labels=1 (use its base model, which the reward stage gives one label)")
    return None


def _check_4bit_on_cpu(cfg: RunConfig) -> str | None:
    """QLoRA's NF4 runs on a CPU only for layer widths bitsandbytes' CPU kernel packs; say so now, not mid-SFT."""
    import torch

    from rlhf_lib import models

    if not cfg.sft.quantize_4bit or cfg.run.gpus > 0 or torch.cuda.is_available():
        return None  # on a GPU, NF4 takes any width
    ref = cfg.policy.model
    if ref == models.TINY:
        config = models.tiny_policy_config(cfg.policy.tiny)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ref, trust_remote_code=cfg.run.trust_remote_code)
    bad = models.layers_4bit_cpu_cannot_run(config)
    if not bad:
        return None
    name, k, n = bad[0]
    return (f"sft.quantize_4bit: bitsandbytes' CPU 4-bit kernel needs every quantized layer's output width to be a "
            f"multiple of {models.BNB_CPU_BLOCK_N} (and its input width even); {ref!r} has {len(bad)} layer(s) that "
            f"are not, e.g. {name} ({k} -> {n}). Set sft.quantize_4bit = false (LoRA on the full-precision base) "
            f"or run SFT on a GPU")


def check(cfg: RunConfig) -> list[str]:
    """All problems found, empty when the run can start."""
    from rlhf_lib import models

    problems = []
    for kind in KINDS:
        section = getattr(cfg.data, kind)
        for field in ("source", "eval_source"):
            value = getattr(section, field)
            if value:
                problem = _check_source(f"data.{kind}.{field}", value, kind,
                                        lake.column_map(kind, section.format, section.columns))
                if problem:
                    problems.append(problem)
    needs_reward_model = not cfg.reward.function or cfg.gold_judge == "reward_model"
    model_refs = [("policy.model", cfg.policy.model)]
    if needs_reward_model:
        model_refs.append(("reward_model.model", cfg.reward_model.model))
    for key, ref in model_refs:
        try:
            models.check_reachable(ref, key)
        except models.ModelError as err:
            problems.append(str(err))
    judges = []
    if cfg.data.preference.source == AI_FEEDBACK:
        judges.append(("rlaif.judge_model", cfg.rlaif.judge_model))
    if cfg.gold_judge == "judge_model":
        judges.append(("eval.gold_judge_model", cfg.eval.gold_judge_model))
    for key, ref in judges:
        try:
            models.check_reachable(ref, key)
        except models.ModelError as err:
            problems.append(str(err))
    if judges and not cfg.rlaif.constitution_path.is_file():
        problems.append(f"rlaif.constitution: {str(cfg.rlaif.constitution_path)!r} does not exist; point it at a "
                        f"text file of principles (the default is configs/constitution.txt)")
    from rlhf_lib import scoring

    for key, spec in (("reward.function", cfg.reward.function),
                      ("eval.gold_function", cfg.eval.gold_function if cfg.gold_judge == "function" else "")):
        problem = scoring.check_function(spec) if spec else None
        if problem:
            problems.append(f"{key}: {problem}; it must be `module:function` taking (prompts, completions) and "
                            f"returning one float per completion")
    if needs_reward_model and not any(p.startswith("reward_model.model") for p in problems):
        problem = _check_reward_model_config(cfg.reward_model.model, cfg.run.trust_remote_code)
        if problem:
            problems.append(problem)
    if not any(p.startswith("policy.model") for p in problems):
        problem = _check_4bit_on_cpu(cfg)
        if problem:
            problems.append(problem)
    from rlhf_lib import compute, launch, storage

    processes = cfg.run.processes
    if "ppo" in cfg.run.methods and cfg.ppo.batch_size % processes:
        problems.append(f"ppo.batch_size ({cfg.ppo.batch_size}) is the global batch: it must be divisible by the "
                        f"{processes} processes run.gpus x run.nodes give (each generates an equal share)")

    if cfg.run.gpus and not compute.runs_remote():  # steps run here: this machine must have the GPUs
        try:
            visible = launch.visible_gpus()
        except launch.MachineUnfit as err:
            problems.append(f"run.gpus: {err}")
        else:
            if visible < cfg.run.gpus:
                problems.append(f"run.gpus = {cfg.run.gpus} but this machine has {visible} GPU(s) "
                                f"(CUDA_VISIBLE_DEVICES={launch.cuda_visible_devices()!r}): set run.gpus = {visible} "
                                f"(0 runs every stage on the CPU), or run where the GPUs are")
    problem = storage.check_root(cfg.storage_uri)
    if problem:
        problems.append(problem)
    root = cfg.local_root
    existing = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(existing).free / 1e9
    if free_gb < cfg.run.min_free_disk_gb:
        problems.append(f"run.storage_root: only {free_gb:.1f} GB free under {existing}, run.min_free_disk_gb is "
                        f"{cfg.run.min_free_disk_gb}; free space or point run.storage_root elsewhere")
    return problems


def check_or_raise(cfg: RunConfig) -> None:
    problems = check(cfg)
    if problems:
        raise PreflightError(problems)
