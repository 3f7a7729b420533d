"""The memory model behind `[resources]` in configs/opt-1.3b.toml: what each GPU stage of the seed's recipe needs
per process (GPU memory) and per node (host memory, /dev/shm, disk), from the models' exact parameter counts and the
config's batch sizes and lengths.

    python bench/memory_model.py [--config configs/opt-1.3b.toml] [--check-rehearsal]
    python bench/memory_model.py --resources      # the [resources] block the model gives, to paste into the config

Parameter counts come from the published architectures (bench/standins.py), instantiated on torch's meta device (no
memory, no download). The byte costs per parameter and per token are the standard ones, written out below; the
host-memory terms are calibrated on the CPU rehearsal (bench/recipe_rehearsal.py), and `--check-rehearsal` prints
the model's prediction for that run beside what it measured, so the calibration can be checked rather than trusted.
BENCHMARKS.md ("Memory model for the GPU recipe") holds the output and how `[resources]` follows from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REHEARSAL_CONFIG = ROOT / "configs" / "opt-1.3b-rehearsal.toml"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import math

GB = 1e9
MIB = 2**20
BF16, FP32 = 2, 4
ADAM_STATE = 4 + 4 + 4 + 4   # fp32 weight, fp32 gradient, Adam's two moments: a trained parameter
NF4 = 0.5 + 0.127 / 8        # 4 bits + double-quantized absmax (8-bit per 64 weights, fp32 per 256 blocks)
ACTIVATION_PER_TOKEN_LAYER = 34  # bytes x hidden size: one transformer layer's saved activations in 16-bit, with
# a fused (SDPA) attention that keeps no seq x seq scores (Korthikanti et al. 2022, table 2 without the 5as/h term)
LOGIT_BYTES_TRAINING = 2 + 4 + 4  # bf16 logits, their fp32 upcast for the loss, its gradient
LOGIT_BYTES_SCORING = 2 + 4 + 4  # bf16 logits, their fp32 upcast, its log-softmax (rl.logprobs_from_logits)
EVAL_ROWS = 16               # rows rl.sample_answers / rl.response_logprobs take at once (their batch_size)
HOST_RUNTIME_CPU = 0.7 * GB  # python + torch + transformers imported, measured on this CPU (no CUDA)

# ASSUMED: constants this project has not measured (it has run on no GPU and no cluster). `--resources` prints
# them as assumed beside the block they set; measure them on a GPU node (bench/gpu_smoke.sh) before trusting it.
CUDA_RUNTIME = 1.5 * GB      # CUDA context, cuBLAS/NCCL workspaces, on every GPU process
FRAGMENTATION = 1.2          # the caching allocator's slack over the live tensors
HOST_RUNTIME_GPU = 3.0 * GB  # the host side of HOST_RUNTIME_CPU with CUDA's libraries mapped and a context created
NODE_HEADROOM = 1.25         # on top of the sum of a node's processes: page cache, the stage wrapper, monitoring
DISK_HEADROOM = 1.5          # on top of a stage's files: logs, temporary copies while an upload runs, the HF cache's
# lock and metadata files
DATASETS_GB = 5.0            # the materialised splits: OpenOrca's 1 M rows (~1.2 KB each), hh-rlhf's 160 K pairs
SHARED_MEMORY_MB = {"train": 8192, "infer": 2048, "light": 2048}  # /dev/shm: NCCL's intra-node transport between
# a train node's processes, the dataloader; counted in a pod's memory
CPU_PER_PROCESS, CPU_PER_NODE = 2, 8  # cores a training process feeds its GPU with; the node's rest (data, uploads)
LIGHT = {"memory_mb": 32768, "disk_mb": 102400}  # the data step at full size (not measured: it streams the hub's
# datasets into local ones, OpenOrca alone several GB)
ASSUMED = {"CUDA runtime per GPU process": f"{CUDA_RUNTIME / GB:.1f} GB",
           "GPU allocator slack": f"{FRAGMENTATION}x", "host runtime per GPU process": f"{HOST_RUNTIME_GPU / GB:.1f} GB",
           "node memory headroom": f"{NODE_HEADROOM}x", "disk headroom": f"{DISK_HEADROOM}x",
           "materialised datasets": f"{DATASETS_GB:.0f} GB", "/dev/shm per kind (MiB)": str(SHARED_MEMORY_MB),
           "cores": f"{CPU_PER_PROCESS} per training process + {CPU_PER_NODE} per node",
           "light (data) step": f"{LIGHT['memory_mb']} MiB memory, {LIGHT['disk_mb']} MiB disk"}


def parameter_counts(size: str = "full") -> dict[str, int]:
    """Exact parameter counts of the recipe's models (bench/standins.py: `full` the published architectures, `tiny`
    the rehearsal test's) and of the parts the recipe treats differently."""
    import torch
    from transformers import (DebertaV2Config, DebertaV2ForSequenceClassification, OPTConfig,
                              OPTForCausalLM)

    import standins

    policy, reward = standins.SIZES[size]["policy"], standins.SIZES[size]["reward"]
    with torch.device("meta"):
        opt = OPTForCausalLM(OPTConfig(**{k: v for k, v in policy.items() if not k.startswith("_")}))
        deberta = DebertaV2ForSequenceClassification(
            DebertaV2Config(**{k: v for k, v in reward.items() if k != "model_type"}, num_labels=1))
    linear = sum(m.weight.numel() for n, m in opt.model.decoder.layers.named_modules()
                 if isinstance(m, torch.nn.Linear))
    return {"policy": sum(p.numel() for p in opt.parameters()), "policy_linear": linear,
            "reward": sum(p.numel() for p in deberta.parameters()), "hidden": opt.config.hidden_size,
            "layers": opt.config.num_hidden_layers, "vocab": opt.config.vocab_size,
            "reward_hidden": deberta.config.hidden_size, "reward_layers": deberta.config.num_hidden_layers}


def lora_parameters(counts: dict, lora) -> int:
    """A LoRA adapter of rank r on square hidden x hidden projections (q_proj, v_proj...): r x 2 x hidden each."""
    return counts["layers"] * len(lora.target_modules) * lora.r * 2 * counts["hidden"]


def activations(counts: dict, tokens: int, checkpointing: bool, hidden="hidden", layers="layers") -> float:
    """Saved activations of a forward that will be back-propagated, for `tokens` tokens in the micro-batch."""
    per_layer = ACTIVATION_PER_TOKEN_LAYER * tokens * counts[hidden]
    if checkpointing:  # each layer's input kept (bf16), one layer recomputed at a time
        return counts[layers] * BF16 * tokens * counts[hidden] + per_layer
    return counts[layers] * per_layer


def gpu_needs(cfg, counts: dict) -> dict[str, dict[str, float]]:
    """GB of GPU memory per process, by stage and by term."""
    s, r, p = cfg.sft, cfg.reward, cfg.ppo
    world = max(cfg.run.processes, 1)
    policy, reward = counts["policy"], counts["reward"]
    frozen_bf16 = policy - counts["policy_linear"]  # embeddings, layer norms, biases: not quantized
    sft_tokens = s.batch_size * s.max_length
    ppo_rows = min(p.mini_batch_size, p.batch_size // world)  # rollouts of one rank's micro-batch, at most
    ppo_tokens = ppo_rows * (p.max_prompt_length + p.max_response_length)
    # PPO's LM head runs on the response positions only (logits_to_keep: the trainer's _forward_response)
    ppo_logit_rows = ppo_rows * (p.max_response_length + 1)
    # evaluate scores EVAL_ROWS rows at once, each prompt + answer, its logits over every position in fp32
    eval_tokens = EVAL_ROWS * (p.max_prompt_length + cfg.eval.max_new_tokens)
    needs = {
        "sft": {"weights (NF4 linears + bf16 rest)": counts["policy_linear"] * NF4 + frozen_bf16 * BF16,
                "LoRA + Adam": lora_parameters(counts, s.lora) * ADAM_STATE,
                "activations (checkpointed)": activations(counts, sft_tokens, True),
                "logits": sft_tokens * counts["vocab"] * LOGIT_BYTES_TRAINING},
        # Full fine-tuning in mixed precision; a preference pair is two sequences.
        "reward": {"weights + Adam (fp32)": reward * ADAM_STATE,
                   "activations (checkpointed)": activations(counts, 2 * r.batch_size * r.max_length, True,
                                                             "reward_hidden", "reward_layers")},
        # Policy and reference share one bf16 copy (the reference is the adapter switched off); no checkpointing.
        "ppo": {"policy (bf16) + reward model (bf16)": (policy + reward) * BF16,
                "LoRA + Adam + value head": (lora_parameters(counts, p.lora) + counts["hidden"] + 1) * ADAM_STATE,
                "KV cache while generating": (p.batch_size // world) * (p.max_prompt_length + p.max_response_length)
                * 2 * counts["layers"] * counts["hidden"] * BF16,
                "activations": activations(counts, ppo_tokens, False),
                "logits (response positions)": ppo_logit_rows * counts["vocab"] * LOGIT_BYTES_TRAINING},
        # peft's merge_and_unload folds the adapter into the base's weights in place: one copy.
        "merge": {"base, merged in place (bf16)": policy * BF16},
        # SFT's model stays (the KL reference) beside each method's in turn; the proxy and the gold reward model.
        "evaluate": {"SFT + one method's policy (bf16)": 2 * policy * BF16, "two reward models (bf16)": 2 * reward * BF16,
                     "KV cache": eval_tokens * 2 * counts["layers"] * counts["hidden"] * BF16,
                     "log-prob logits (every position)": eval_tokens * counts["vocab"] * LOGIT_BYTES_SCORING},
    }
    for terms in needs.values():
        terms["CUDA runtime"] = CUDA_RUNTIME
    return {stage: {k: v / GB for k, v in terms.items()} for stage, terms in needs.items()}


def host_per_process(counts: dict, gpu: bool, checkpoint_bytes: int, compute_bytes: int) -> float:
    """GB of host memory one stage process peaks at while loading the policy: its runtime, the checkpoint's pages as
    read (memory-mapped; the hub's .bin is fp16, a merged model is in the compute dtype) and the model built from
    it in the compute dtype before it moves to the GPU (on a CPU it stays: that copy is the model). The reward
    model's share (under a seventh of the policy's) is in NODE_HEADROOM."""
    runtime = HOST_RUNTIME_GPU if gpu else HOST_RUNTIME_CPU
    return (runtime + counts["policy"] * (checkpoint_bytes + compute_bytes)) / GB


def disk_needs(cfg, counts: dict) -> dict[str, float]:
    """GB a stage's pod holds on its disk: the hub's files in its HF cache, what it downloads from storage, what it
    writes (hard-linked snapshots are uploaded without copies). Datasets: DATASETS_GB for the materialised splits
    (OpenOrca's million rows are most of it)."""
    from rlhf_lib import methods

    hub_policy, hub_reward = counts["policy"] * 2 / GB, counts["reward"] * 2 / GB  # fp16 .bin on the hub
    policy_bf16, reward_fp32 = counts["policy"] * BF16 / GB, counts["reward"] * FP32 / GB
    lora = lora_parameters(counts, cfg.ppo.lora) * FP32 / GB
    return {
        "sft": hub_policy + DATASETS_GB + 2 * 3 * lora,  # two checkpoints of adapter + Adam's moments
        "merge": hub_policy + policy_bf16,
        # the proxy and the gold reward model (reward_model gold judge: trained in the same step), each with two
        # HF checkpoints (fp32 weights + Adam's moments) and its final model
        "reward": hub_reward + DATASETS_GB + 2 * (2 * 3 * reward_fp32 + reward_fp32),
        "ppo": policy_bf16 + reward_fp32 + 2 * 3 * lora + cfg.ppo.steps // cfg.ppo.save_freq * lora + policy_bf16,
        # the SFT model and every method's merged model, the proxy and the gold reward model
        "evaluate": (1 + len(methods.names())) * policy_bf16 + 2 * reward_fp32,
    }



def node_needs(cfg, counts: dict, gpu: dict) -> dict[str, dict[str, float]]:
    """What one node needs, by step kind (GB): host memory (its processes x host_per_process x NODE_HEADROOM),
    the GPU memory of its largest stage per process, the disk of its largest stage."""
    processes = max(cfg.run.gpus, 1)
    per_process = host_per_process(counts, True, BF16, BF16)
    disk = disk_needs(cfg, counts)
    kinds = {"train": (processes, ("sft", "reward", "ppo")), "infer": (1, ("merge", "evaluate"))}
    return {kind: {"processes": n, "host memory per process": per_process,
                   "host memory": n * per_process * NODE_HEADROOM,
                   "GPU memory per process": max(sum(gpu[s].values()) for s in stages) * FRAGMENTATION,
                   "disk": max(disk[s] for s in stages)}
            for kind, (n, stages) in kinds.items()}


def whole_gib_in_mib(gb: float) -> int:
    """`gb` (1e9 bytes) rounded up to whole GiB, in MiB: the unit of `[resources]`."""
    return math.ceil(gb * GB / 2**30) * 1024


def resources(cfg, counts: dict) -> dict[str, dict[str, int]]:
    """The `[resources]` block (cpu, memory_mb, shared_memory_mb, disk_mb per step kind, all sizes in MiB) the
    model gives for `cfg`: a node's host memory plus its /dev/shm (a pod counts it in its memory), the disk of its
    largest stage with DISK_HEADROOM and at least run.min_free_disk_gb (the start step's disk check)."""
    node = node_needs(cfg, counts, gpu_needs(cfg, counts))
    block = {}
    for kind, needs in node.items():
        shm = SHARED_MEMORY_MB[kind]
        block[kind] = {"cpu": CPU_PER_PROCESS * needs["processes"] + CPU_PER_NODE,
                       "memory_mb": whole_gib_in_mib(needs["host memory"]) + shm, "shared_memory_mb": shm,
                       "disk_mb": whole_gib_in_mib(max(needs["disk"] * DISK_HEADROOM, cfg.run.min_free_disk_gb))}
    block["light"] = {"cpu": CPU_PER_NODE, "memory_mb": LIGHT["memory_mb"], "shared_memory_mb": SHARED_MEMORY_MB["light"],
                      "disk_mb": LIGHT["disk_mb"]}
    return block


def print_resources(cfg, counts: dict, config_path: str) -> None:
    """The block as TOML lines (tolerations and node selectors are the cluster's, not the model's: keep yours)."""
    print(f"# [resources] from bench/memory_model.py for {config_path}; sizes in MiB. Assumed, not measured: "
          + "; ".join(f"{k} {v}" for k, v in ASSUMED.items()))
    print("[resources]")
    for kind, values in resources(cfg, counts).items():
        print(f"{kind} = {{ " + ", ".join(f"{k} = {v}" for k, v in values.items()) + " }")


# Measured: each CPU stage process's resident memory with tiny models (bench/recipe_rehearsal.py --tiny, 2026-12-07,
# rounded up to 0.05 GB): python, torch, transformers and what the stage imports (TRL, accelerate, Deep Lake), its
# buffers and threads — merge, which imports the least, 0.50 GB; a TRL trainer's stage 0.68.
HOST_RUNTIME_CPU_BY_STAGE = {"sft": 0.7, "merge": 0.55, "rlaif": 0.65, "reward": 0.7, "ppo": 0.75, "dpo": 0.7,
                             "rest": 0.7, "grpo": 0.7, "rloo": 0.7, "evaluate": 0.7}


def rehearsal_prediction(counts: dict, cfg) -> dict[str, float]:
    """The model's host-memory peak (GB) for each stage of the CPU rehearsal (one process, fp32 compute): the
    stage's runtime, the checkpoint's pages as read and the model built from them, with the stage's own terms."""
    policy, reward = counts["policy"], counts["reward"]
    run = {stage: gb * GB for stage, gb in HOST_RUNTIME_CPU_BY_STAGE.items()}
    merged = policy * (FP32 + FP32)  # the fp32 merged SFT model: its safetensors pages and the model
    # QLoRA on a CPU: the hub's fp16 .bin read whole (torch.load maps nothing) and each weight upcast to fp32 before
    # bitsandbytes quantizes it; the NF4 model is what stays
    nf4 = counts["policy_linear"] * NF4 + (policy - counts["policy_linear"]) * FP32
    eval_rows = EVAL_ROWS * (cfg.ppo.max_prompt_length + cfg.eval.max_new_tokens)
    bytes_ = {
        "sft": run["sft"] + policy * (2 + FP32) + nf4,
        "merge": run["merge"] + policy * (2 + FP32),  # the hub's fp16 .bin, the fp32 model merged in place
        # one model at a time: the policy samples and is freed, then the hub's judge (fp16 .bin, fp32 model) scores
        "rlaif": run["rlaif"] + max(merged, policy * (2 + FP32)),
        "reward": run["reward"] + reward * (2 + ADAM_STATE),  # full fine-tuning: weights, gradients, Adam
        "ppo": run["ppo"] + merged + 2 * FP32 * reward,
        "dpo": run["dpo"] + merged, "grpo": run["grpo"] + merged + FP32 * reward,
        "rloo": run["rloo"] + merged + FP32 * reward, "rest": run["rest"] + merged + FP32 * reward,
        # the SFT model and one method's at a time, both reward models, the fp32 log-prob logits of EVAL_ROWS rows
        "evaluate": run["evaluate"] + 2 * policy * FP32 + 2 * reward * FP32 + eval_rows * counts["vocab"] * 8,
    }
    return {stage: b / GB for stage, b in bytes_.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "opt-1.3b.toml"))
    parser.add_argument("--resources", action="store_true", help="print only the [resources] block the model gives")
    parser.add_argument("--check-rehearsal", action="store_true",
                        help="also print the model's host peaks for the CPU rehearsal's stages")
    args = parser.parse_args()
    from rlhf_lib import config

    cfg = config.load(args.config)
    counts = parameter_counts()
    if args.resources:
        return print_resources(cfg, counts, args.config)
    print(f"parameters: OPT-1.3B {counts['policy']:,} ({counts['policy_linear']:,} in decoder linears), "
          f"DeBERTa-v3-base + score head {counts['reward']:,}; LoRA (sft) {lora_parameters(counts, cfg.sft.lora):,}")
    gpu = gpu_needs(cfg, counts)
    print(f"\nGPU memory per process, {cfg.run.processes} process(es) ({args.config}):")
    for stage, terms in gpu.items():
        detail = ", ".join(f"{k} {v:.2f}" for k, v in terms.items())
        print(f"- {stage}: {sum(terms.values()):.1f} GB ({FRAGMENTATION:.1f}x with allocator slack: "
              f"{sum(terms.values()) * FRAGMENTATION:.1f} GB) = {detail}")
    print("\nPer node:")
    for kind, needs in node_needs(cfg, counts, gpu).items():
        print(f"- {kind}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in needs.items()))
    print("\nAssumed, not measured: " + "; ".join(f"{k} {v}" for k, v in ASSUMED.items()))
    if args.check_rehearsal:
        print("\nCPU rehearsal, predicted host peak per stage (GB): " + ", ".join(
            f"{k} {v:.1f}" for k, v in rehearsal_prediction(counts, config.load(REHEARSAL_CONFIG)).items()))


if __name__ == "__main__":
    main()
