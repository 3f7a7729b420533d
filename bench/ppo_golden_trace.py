"""A golden trace of the reference PPO: what trl 1.12's PPOTrainer (`trl.experimental.ppo`, the last TRL PPO, its own
code) computes in one PPO step, token by token and mini-batch by mini-batch, and the adaptive KL controller as trl
0.11 implemented it (Ziegler et al. 2019). tests/test_ppo_golden.py feeds the same tensors to our PPO
(`rlhf_lib/stages/ppo/losses.py` and the trainer's step) and compares in float64.

    python bench/ppo_golden_trace.py            # writes tests/fixtures/ppo_golden_trl112.json

trl 1.12.0 runs in its own virtual environment (bench/.venv-trl112, made on first use, as bench/ppo_vs_trl.py does).
Tiny OPT models (random weights, float64, a 40- or 200-word vocabulary) stand in for the policy, reference, value
and reward models: the trace is about the arithmetic, not the models. TRL's `train()` runs unchanged for one step;
a trace function on its frame records each tensor as TRL binds it (queries, responses, old and reference
log-probs, values, scores, masks, KL-penalised rewards, GAE advantages before and after whitening, returns; per
mini-batch the new log-probs and values, the policy and value losses, clip fractions and approx-KL). Two traces:
`eos` (responses stopped at EOS: TRL's padding masks at work) and `full` (every response full length: where TRL's
masks and ours coincide, so the trainer's own functions are compared end to end). The KL controller's updates are
those of the `AdaptiveKLController` class in trl 0.11.4's `trl/trainer/utils.py` (downloaded, not installed: it
is read from the wheel and run as it is).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "ppo_golden_trl112.json"
COMMAND = "python bench/ppo_golden_trace.py"
PPO = dict(kl_coef=0.2, cliprange=0.2, vf_coef=0.1, cliprange_value=0.02, gamma=1.0, lam=0.95)  # a narrow value clip: exercised
TRACES = {  # name: (vocabulary size, response length, stop at EOS, seed)
    "eos": (40, 16, True, 3),
    "full": (200, 8, False, 2),
}
# What the trace keeps of TRL's train() locals: at the start of the PPO epochs (the rollout phase's results) ...
ROLLOUT = ("queries", "responses", "logprobs", "ref_logprobs", "values", "scores", "sequence_lengths",
           "padding_mask", "padding_mask_p1", "kl", "non_score_reward", "rewards", "advantages", "returns")
# ... and at every micro-batch, once its approx-KL is computed.
MINIBATCH = ("ppo_epoch_idx", "micro_batch_inds", "new_logprobs", "vpred", "mb_advantage", "mb_return", "mb_values",
             "mb_logprobs", "pg_loss", "vf_loss", "loss", "pg_clipfrac", "vf_clipfrac", "approxkl")


def _plain(value):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.tolist() if value.dtype != torch.bool else value.int().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _tiny_models(vocab_size: int, seed: int):
    """(tokenizer, policy, reference, value model, reward model, train prompts): tiny float64 OPTs, the reference a
    little off the policy, seeded."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import OPTConfig, OPTForCausalLM, OPTForSequenceClassification, PreTrainedTokenizerFast

    import datasets

    torch.manual_seed(seed)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 3)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="left")
    config = OPTConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                       max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=1, dropout=0.0, num_labels=1)
    policy, ref = OPTForCausalLM(config).double(), OPTForCausalLM(config).double()
    ref.load_state_dict(policy.state_dict())
    with torch.no_grad():  # a reference a little off the policy, so the KL penalty is not ~0 on the first step
        for param in ref.parameters():
            param.add_(0.3 * torch.randn_like(param) * param.std().clamp(min=1e-3))
    value, reward = OPTForSequenceClassification(config).double(), OPTForSequenceClassification(config).double()
    gen = torch.Generator().manual_seed(seed)
    queries = [torch.randint(3, vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 7, (8,), generator=gen)]
    return tok, policy, ref, value, reward, datasets.Dataset.from_dict({"input_ids": queries})


def _traced_train(trainer, train_code) -> tuple[dict, list[dict]]:
    """Run `trainer.train()` with a line tracer on `train_code` (PPOTrainer.train): the rollout's tensors once, and
    each mini-batch's as it ends."""
    rollout, minibatches, last = {}, [], {}

    def local_trace(frame, event, arg):
        if event != "line":
            return local_trace
        f = frame.f_locals
        if "returns" in f and "advantages_gae" not in rollout:
            rollout["advantages_gae"] = _plain(f["advantages"])  # returns = advantages + values: not yet whitened
        if "ppo_epoch_idx" in f and "rewards" not in rollout:
            rollout.update({k: _plain(f[k]) for k in ROLLOUT})
        if "approxkl" not in f:  # deleted at the end of each mini-batch: the next one is new even at the same id
            last.pop("approxkl", None)
        elif id(f["approxkl"]) != last.get("approxkl"):
            last["approxkl"] = id(f["approxkl"])
            minibatches.append({k: _plain(f[k]) for k in MINIBATCH})
        return local_trace

    def global_trace(frame, event, arg):
        if event == "call" and frame.f_code is train_code:
            return local_trace
        return None

    sys.settrace(global_trace)
    try:
        trainer.train()
    finally:
        sys.settrace(None)
    return rollout, minibatches


def trace_worker(name: str) -> dict:
    """In the trl 1.12 environment: one step of TRL's PPOTrainer.train(), traced."""
    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    vocab_size, response_length, stop_at_eos, seed = TRACES[name]
    torch.set_num_threads(1)
    tok, policy, ref, value, reward, train = _tiny_models(vocab_size, seed)
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                         num_mini_batches=2, num_ppo_epochs=2, response_length=response_length,
                         stop_token="eos" if stop_at_eos else None, temperature=1.0, learning_rate=3e-2,
                         total_episodes=8, local_rollout_forward_batch_size=8, num_sample_generations=0,
                         whiten_rewards=False, kl_estimator="k1", missing_eos_penalty=None, report_to=[],
                         use_cpu=True, bf16=False, fp16=False, save_strategy="no", seed=seed,
                         dataloader_num_workers=0, **PPO)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=train)
        rollout, minibatches = _traced_train(trainer, PPOTrainer.train.__code__)
    lengths = rollout["sequence_lengths"]
    if stop_at_eos:
        assert len(set(lengths)) > 2 and min(lengths) < response_length - 2, f"lengths too alike: {lengths}"
    else:
        assert all(n == response_length - 1 for n in lengths), f"a response holds a pad token: {lengths}"
    # One rollout batch of 8 (per device 8 x accumulation 1), 2 mini-batches of 4 (one micro-batch each), 2 epochs.
    assert len(minibatches) == 4, len(minibatches)
    return {"vocab_size": vocab_size, "response_length": response_length, "stop_at_eos": stop_at_eos,
            "seed": seed, "rollout": rollout, "minibatches": minibatches}


def kl_controller_reference() -> dict:
    """trl 0.11.4's AdaptiveKLController, read from its wheel and run as it is, on a sequence of (KL, n)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "trl==0.11.4", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("trl-0.11.4-*.whl"))
        source = zipfile.ZipFile(wheel).read("trl/trainer/utils.py").decode()
    module = ast.parse(source)
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "AdaptiveKLController")
    namespace = {"np": np}
    exec(compile(ast.Module(body=[cls], type_ignores=[]), "trl-0.11.4/trl/trainer/utils.py", "exec"), namespace)
    ctl = namespace["AdaptiveKLController"](0.2, 6.0, 10000)
    updates = []
    for kl, n in [(12.0, 32), (9.0, 32), (6.0, 256), (3.0, 32), (5.4, 64), (0.5, 8), (7.2, 32), (6.3, 1024)]:
        ctl.update(kl, n)
        updates.append({"kl": kl, "n": n, "value": float(ctl.value)})
    return {"source": "trl 0.11.4 trl/trainer/utils.py AdaptiveKLController", "class_source": ast.unparse(cls),
            "init_kl_coef": 0.2, "target": 6.0, "horizon": 10000, "updates": updates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(FIXTURE))
    parser.add_argument("--worker", choices=sorted(TRACES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(trace_worker(args.worker)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from ppo_vs_trl import ensure_trl_venv

    trl_python = ensure_trl_venv()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    traces = {}
    for name in TRACES:
        proc = subprocess.run([str(trl_python), __file__, "--worker", name], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"trace {name} failed:\n{proc.stderr[-4000:]}")
        traces[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[golden] {name}: sequence lengths {traces[name]['rollout']['sequence_lengths']}", flush=True)
    versions = subprocess.run([str(trl_python), "-c", "import trl, torch, transformers; "
                               "print(trl.__version__, torch.__version__, transformers.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    fixture = {"command": COMMAND, "made_with": dict(zip(("trl", "torch", "transformers"), versions)),
               "ppo": PPO, "traces": traces, "kl_controller": kl_controller_reference()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"[golden] wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
