"""Checks the `start` step runs in seconds, before any training: everything that would otherwise fail an hour in.

`CHECKS` is a list of small checks, each `check(cfg) -> list of problems`, then every method in `run.methods`
adds its own (its registry row's `check`). Each problem is one line naming the config key and the fix;
`check_or_raise` raises PreflightError with all of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlhf_lib import methods
from rlhf_lib.config import AI_FEEDBACK, RunConfig
from rlhf_lib.data import lake
from rlhf_lib.data.ingest import KINDS
from rlhf_lib.env import runs_remote


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


def data_sources(cfg: RunConfig) -> list[str]:
    """Every configured dataset source exists and has the columns its kind needs."""
    problems = []
    for kind in KINDS:
        section = getattr(cfg.data, kind)
        mapping = lake.column_map(kind, section.format, section.columns)
        for field in ("source", "eval_source"):
            value = getattr(section, field)
            problem = _check_source(f"data.{kind}.{field}", value, kind, mapping) if value else None
            if problem:
                problems.append(problem)
    return problems


def needs_reward_model(cfg: RunConfig) -> bool:
    return not cfg.reward.function or cfg.resolved_gold_judge == "reward_model"


def model_refs(cfg: RunConfig) -> list[tuple[str, str]]:
    """(config key, reference) of every model the run loads."""
    refs = [("policy.model", cfg.policy.model)]
    if needs_reward_model(cfg):
        refs.append(("reward_model.model", cfg.reward_model.model))
    if cfg.data.preference.source == AI_FEEDBACK:
        refs.append(("rlaif.judge_model", cfg.rlaif.judge_model))
    if cfg.resolved_gold_judge == "judge_model":
        refs.append(("eval.gold_judge_model", cfg.eval.gold_judge_model))
    return refs


def loadable_models(cfg: RunConfig) -> list[str]:
    """Every model the run loads has its config, weights (safetensors, or `.bin` that unpickles as weights only)
    and tokenizer where it will be read: a local directory, the HF cache, or the hub."""
    from rlhf_lib import hub

    problems = []
    for key, ref in model_refs(cfg):
        try:
            hub.check_loadable(ref, key, cfg.run.trust_remote_code)
        except hub.ModelError as err:
            problems.append(str(err))
    return problems


def constitution(cfg: RunConfig) -> list[str]:
    """A judge model needs its constitution."""
    judged = cfg.data.preference.source == AI_FEEDBACK or cfg.resolved_gold_judge == "judge_model"
    if judged and not cfg.rlaif.constitution_path.is_file():
        return [f"rlaif.constitution: {str(cfg.rlaif.constitution_path)!r} does not exist; point it at a text file "
                f"of principles (the default is configs/constitution.txt)"]
    return []


def reward_functions(cfg: RunConfig) -> list[str]:
    """Each configured reward function imports and scores a sample completion."""
    from rlhf_lib import scoring

    problems = []
    for key, spec in (("reward.function", cfg.reward.function),
                      ("eval.gold_function", cfg.eval.gold_function if cfg.resolved_gold_judge == "function" else "")):
        problem = scoring.check_function(spec) if spec else None
        if problem:
            problems.append(f"{key}: {problem}; it must be `module:function` taking (prompts, completions) and "
                            f"returning one float per completion")
    return problems


def reward_model_shape(cfg: RunConfig) -> list[str]:
    """A reward model must be a sequence classifier with one label (or a base model we give one label)."""
    ref = cfg.reward_model.model
    if not needs_reward_model(cfg) or ref == "tiny":
        return []
    from rlhf_lib import models

    try:
        config = models.load_config(ref, cfg.run.trust_remote_code)
    except Exception as err:
        return [f"reward_model.model: cannot read config of {ref!r}: {err}"]
    archs = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return [f"reward_model.model: {ref!r} is a causal LM ({archs[0]}); use an encoder/sequence classifier such "
                f"as microsoft/deberta-v3-base"]
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        return [f"reward_model.model: {ref!r} is a classifier with {config.num_labels} labels; a reward model needs "
                f"num_labels=1 (use its base model, which the reward stage gives one label)"]
    return []


def four_bit_on_cpu(cfg: RunConfig) -> list[str]:
    """QLoRA's NF4 runs on a CPU only for layer widths bitsandbytes' CPU kernel packs; say so now, not mid-SFT."""
    from rlhf_lib import models

    # On a GPU NF4 takes any width. run.gpus = 0 runs every stage on the CPU even where GPUs are visible
    # (launch.py hides them), so what decides is the config, not this machine.
    if not cfg.sft.quantize_4bit or cfg.run.gpus > 0:
        return []
    ref = cfg.policy.model
    if ref == models.TINY:
        config = models.tiny_policy_config(cfg.policy.tiny)
    else:
        config = models.load_config(ref, cfg.run.trust_remote_code)
    bad = models.layers_4bit_cpu_cannot_run(config)
    if not bad:
        return []
    name, k, n = bad[0]
    return [f"sft.quantize_4bit: bitsandbytes' CPU 4-bit kernel needs every quantized layer's output width to be a "
            f"multiple of {models.BNB_CPU_BLOCK_N} and its input width a multiple of {models.BNB_QUANT_BLOCK}; {ref!r} has {len(bad)} layer(s) that "
            f"are not, e.g. {name} ({k} -> {n}). Set sft.quantize_4bit = false (LoRA on the full-precision base) "
            f"or run SFT on a GPU"]


def gpus_here(cfg: RunConfig) -> list[str]:
    """When the steps run on this machine, it must have the GPUs run.gpus asks for."""
    from rlhf_lib import launch

    if not cfg.run.gpus or runs_remote():
        return []
    try:
        visible = launch.visible_gpus()
    except launch.MachineUnfit as err:
        return [f"run.gpus: {err}"]
    if visible < cfg.run.gpus:
        return [f"run.gpus = {cfg.run.gpus} but this machine has {visible} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={launch.cuda_visible_devices()!r}): set run.gpus = {visible} (0 runs every "
                f"stage on the CPU), or run where the GPUs are"]
    return []


def storage_root(cfg: RunConfig) -> list[str]:
    """The storage root can be written, and has room."""
    from rlhf_lib import storage

    problem = storage.check_root(cfg.storage_uri)
    if problem:
        return [problem]
    root = cfg.local_root
    existing = next((p for p in [root, *root.parents] if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(existing).free / 1e9
    if free_gb < cfg.run.min_free_disk_gb:
        return [f"run.storage_root: only {free_gb:.1f} GB free under {existing}, run.min_free_disk_gb is "
                f"{cfg.run.min_free_disk_gb}; free space or point run.storage_root elsewhere"]
    return []


def wandb_key(cfg: RunConfig) -> list[str]:
    """Online W&B needs a key where the stages run: without one `sft` would fail minutes in."""
    if cfg.run.wandb_mode != "online" or os.environ.get("WANDB_API_KEY"):
        return []
    import netrc

    try:
        if netrc.netrc().authenticators("api.wandb.ai"):  # `wandb login` writes it there
            return []
    except (OSError, netrc.NetrcParseError):
        pass
    return ["run.wandb_mode = \"online\" but there is no W&B key: export WANDB_API_KEY (on a cluster, give the pods "
            "it as a secret, e.g. @kubernetes(secrets=...) or METAFLOW_KUBERNETES_SECRETS), run `wandb login`, or "
            "set run.wandb_mode = \"offline\" (sync later with `wandb sync`)"]


# In order; a check whose key already has a problem is skipped (loadable_models first: the others read models).
CHECKS = (data_sources, loadable_models, constitution, reward_functions, reward_model_shape, four_bit_on_cpu,
          gpus_here, wandb_key, storage_root)
DEPENDS_ON = {reward_model_shape: "reward_model.model", four_bit_on_cpu: "policy.model"}


def check(cfg: RunConfig) -> list[str]:
    """All problems found, empty when the run can start: the checks above, then each method's own."""
    problems: list[str] = []
    for check_fn in CHECKS:
        key = DEPENDS_ON.get(check_fn)
        if key and any(p.startswith(key) for p in problems):
            continue
        problems += check_fn(cfg)
    for name in cfg.run.methods:
        problems += methods.get(name).problems(cfg)
    return problems


def check_or_raise(cfg: RunConfig) -> None:
    problems = check(cfg)
    if problems:
        raise PreflightError(problems)


# ------------------------------------------------------------------ what `start` says


def judge_costs(cfg: RunConfig) -> list[str]:
    """What the proxy reward and the gold judge cost the run, in words (`start` prints it, the report carries it).
    A gold reward model is trained on half of the preference pairs, so the proxy gets only the other half."""
    if cfg.reward.function:
        proxy = f"proxy reward: the function {cfg.reward.function} (no reward model is trained)"
    else:
        pref = cfg.data.preference
        n = None if pref.source == AI_FEEDBACK else lake.train_rows(pref, cfg.data.sample_rows)
        pairs = "the judged pairs" if pref.source == AI_FEEDBACK else (f"{n} pairs" if n is not None else "the pairs")
        if cfg.resolved_gold_judge == "reward_model":
            half = f"{(n + 1) // 2} of {n} pairs" if n is not None else "half of the pairs"
            proxy = (f"proxy reward model: {half} (the even-numbered); the other half trains the gold reward model "
                     f"(eval.gold_judge = \"reward_model\"). For all of them in the proxy, choose eval.gold_judge "
                     f"= \"rule\" / \"function\" (a rule you can compute) or \"judge_model\" (an LM judge)")
        else:
            proxy = f"proxy reward model: all {pairs}"
    gold = {"rule": "gold judge: the sample data's rule (rlhf_lib/judges.py), computed from the text; no training",
            "reward_model": "gold judge: a second reward model on the other half of the pairs, another seed",
            "judge_model": f"gold judge: {cfg.eval.gold_judge_model} under the constitution, both answer orders",
            "function": f"gold judge: the function {cfg.eval.gold_function}"}[cfg.resolved_gold_judge]
    return [proxy, gold]


def model_revisions(cfg: RunConfig) -> dict[str, str]:
    """The commit each hub model of the run stands for now (offline: the cached snapshot): every stage loads that
    one, wherever and whenever it runs (rlhf_lib/hub.py)."""
    from rlhf_lib import hub

    return {ref: sha for _, ref in model_refs(cfg) if (sha := hub.resolve(ref))}
