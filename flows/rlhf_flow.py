"""RLHFFlow: a pretrained causal LM through SFT (QLoRA), merge, reward modelling and alignment by PPO, DPO, ReST,
GRPO and RLOO side by side, judged by the reward they optimised and by a gold judge none of them saw.

Steps:
    start   validate the config and check, in seconds, that every model, dataset and reward function can be used
    data    materialise each dataset split as a Deep Lake dataset; build the tiny models if configured
    sft     QLoRA supervised fine-tuning of the policy (accelerate subprocess)
    merge   merge the SFT adapter into a full-precision base
    rlaif   (data.preference.source = "ai_feedback") a judge model ranks pairs of SFT answers; else skipped
    reward  train the reward model on preference pairs (and the gold one, when the gold judge is a reward model)
    ppo     our PPO under an adaptive KL leash: ppo_train on one node, or a     } the methods (rlhf_lib/methods.py),
              @parallel gang across run.nodes machines (ppo_gang...)          } side by side from one SFT model;
    dpo     DPO on the preference pairs (TRL DPOTrainer, LoRA, SFT as reference)  } one not in run.methods
    rest    ReST: Grow samples scored by the reward, Improve on the best          } finishes at once, `skipped`
    grpo    GRPO: groups of samples, advantages relative to the group (TRL)      }
    rloo    RLOO: REINFORCE with a leave-one-out baseline (TRL)                  }
    kto     KTO: answers labelled desirable or not, SFT as reference (TRL)       }
    evaluate  SFT vs every method on held-out prompts: proxy and gold win-rates, KL, perplexity, samples, and the
              over-optimisation curve of every method that kept snapshots
    end     print where everything is

GPUs, CPUs, memory, disk and retries of each step come from the config (rlhf_lib/compute.py, `[resources]`),
applied by rlhf_lib/decorators.py.

Run:     python flows/rlhf_flow.py run
Compare: python flows/rlhf_flow.py --config config configs/compare.toml run
Recipe:  python flows/rlhf_flow.py --config config configs/opt-1.3b.toml run
Resume:  python flows/rlhf_flow.py resume ppo
Cluster: python flows/rlhf_flow.py --with kubernetes run   (docs/cluster.md)
"""

import sys
from pathlib import Path

# The run's own code first. In a pod, Metaflow's code package is extracted beside this file, with the project under
# `.mf_code/`: import that copy, never one baked into the image or installed in site-packages (the stages and every
# @parallel node inherit it, see launch.py). In a checkout, the checkout's.
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE / ".mf_code" if (_HERE / ".mf_code").is_dir() else _HERE.parent))

import rlhf_lib  # noqa: E402
from rlhf_lib import env  # noqa: E402

env.configure()  # Metaflow home, user name, W&B mode: before metaflow is imported
if "step" in sys.argv:  # a task: say whose code it runs
    print(f"[code] rlhf_lib imported from {Path(rlhf_lib.__file__).resolve().parent}", flush=True)

from metaflow import Config, FlowSpec, card, current, parallel, step  # noqa: E402

from rlhf_lib.config import DEFAULT_CONFIG, parse_config  # noqa: E402
from rlhf_lib.decorators import ShipProjectFiles, StepCompute  # noqa: E402


@StepCompute
@ShipProjectFiles
class RLHFFlow(FlowSpec):
    """SFT (QLoRA) -> merge -> [AI feedback] -> reward model -> PPO | DPO | ReST | GRPO | RLOO -> evaluate."""

    config = Config("config", default=str(DEFAULT_CONFIG), parser=parse_config,
                    help="TOML run config (configs/tiny.toml by default)")

    @step
    def start(self):
        """Validate the config and every source before anything trains."""
        from rlhf_lib import pipeline

        for key, value in pipeline.start(self.config, getattr(self._datastore, "TYPE", None)).items():
            setattr(self, key, value)
        self.next(self.data)

    @step
    def data(self):
        """Ingest every dataset split into Deep Lake; resolve (or build) the base models."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        prepared = pipeline.prepare_data(cfg, current.run_id, current.retry_count, self.model_revisions)
        self.datasets, self.policy_base = prepared["datasets"], prepared["policy_base"]
        self.reward_base = prepared["reward_base"]
        print(f"[data] policy base: {self.policy_base}; reward base: {self.reward_base}")
        self.next(self.sft)

    @step
    def sft(self):
        """Supervised fine-tuning with QLoRA."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        result = pipeline.run_stage(cfg, "sft", current.run_id, origin_run_id=current.origin_run_id, inputs={
            "base_model": self.policy_base, "train": self.datasets["sft_train"]["uri"],
            "eval": self.datasets["sft_eval"]["uri"]}, attempt=current.retry_count)
        self.sft_adapter_path = result["adapter_path"]
        self.sft_checkpoint_dir = result["checkpoint_dir"]
        self.sft_metrics = result["metrics"]
        self.sft_config = cfg.sft.model_dump()
        self.next(self.merge)

    @step
    def merge(self):
        """Merge the SFT adapter into a bf16 (GPU) / fp32 (CPU) base."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        result = pipeline.run_stage(cfg, "merge", current.run_id, {
            "base_model": self.policy_base, "adapter": self.sft_adapter_path}, attempt=current.retry_count)
        self.sft_merged_path = result["merged_path"]
        self.next(self.rlaif)

    @step
    def rlaif(self):
        """AI feedback: a judge model ranks pairs of SFT answers under the constitution (when configured)."""
        from rlhf_lib import methods, pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        self.rlaif_status = methods.SKIPPED
        self.rlaif_metrics = {}
        if pipeline.uses_ai_feedback(cfg):
            result = pipeline.run_stage(cfg, "rlaif", current.run_id, {
                "sft_model": self.sft_merged_path,
                "judge_model": pipeline.judge_ref(cfg.rlaif.judge_model, self.policy_base, self.model_revisions),
                "prompts": self.datasets["prompts_train"]["uri"]}, attempt=current.retry_count)
            self.datasets = {**self.datasets, "preference_train": {**result["train"], "source": "ai_feedback"},
                             "preference_eval": {**result["eval"], "source": "ai_feedback"}}
            self.rlaif_status, self.rlaif_metrics = "done", result["metrics"]
        self.next(self.reward)

    @step
    def reward(self):
        """Train the reward model on chosen/rejected pairs (and the gold judge's, on the other half)."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        proxy, gold = pipeline.reward_models(cfg, current.run_id, current.origin_run_id, {
            "base_model": self.reward_base, "train": self.datasets["preference_train"]["uri"],
            "eval": self.datasets["preference_eval"]["uri"]}, current.retry_count)
        self.reward_model_path = proxy["model_path"] if proxy else None
        self.reward_checkpoint_dir = proxy["checkpoint_dir"] if proxy else None
        self.reward_metrics = proxy["metrics"] if proxy else {}
        self.reward_config = cfg.reward.model_dump()
        self.gold_reward_model_path = gold["model_path"] if gold else None
        self.gold_reward_metrics = gold["metrics"] if gold else {}
        self.next(self.ppo, self.dpo, self.rest, self.grpo, self.rloo, self.kto)

    # ---------------------------------------------------------------- the methods: one registry row each

    @step
    def ppo(self):
        """Route PPO: one node is a plain step on every backend; run.nodes >= 2 a @parallel gang."""
        from rlhf_lib import pipeline

        pipeline.route(self, "ppo")
        self.next({"one_node": self.ppo_train, "gang": self.ppo_gang}, condition="ppo_layout")

    @step
    def ppo_train(self):
        """PPO on one node: a fresh LoRA adapter + value head on the merged SFT model, trained against the reward."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "ppo", current)
        self.next(self.ppo_join)

    @step
    def ppo_gang(self):
        """Start the PPO gang: run.nodes machines at once."""
        self.next(self.ppo_gang_train, num_parallel=self.ppo_nodes)

    @parallel
    @step
    def ppo_gang_train(self):
        """PPO across nodes: one torch.distributed job (rendezvous at current.parallel's main node); node 0 reports."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "ppo", current)
        self.next(self.ppo_gang_join)

    @step
    def ppo_gang_join(self, inputs):
        """Close the PPO gang: node 0's outcome (only it sets the ppo_* artifacts)."""
        from rlhf_lib import pipeline

        pipeline.join_gang(self, "ppo", inputs)
        self.next(self.ppo_join)

    @step
    def ppo_join(self):
        """Where PPO's two routes meet: its outcome and its card."""
        from rlhf_lib import pipeline

        pipeline.method_card(self, "ppo", current)
        self.next(self.evaluate)

    @step
    def dpo(self):
        """DPO: a fresh LoRA adapter on the merged SFT model, trained on the preference pairs directly."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "dpo", current)
        self.next(self.evaluate)

    @step
    def rest(self):
        """ReST: Grow a scored dataset from the policy, Improve on the samples above a rising threshold."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "rest", current)
        self.next(self.evaluate)

    @step
    def grpo(self):
        """GRPO: groups of samples per prompt, each scored relative to its group, under a KL leash to SFT."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "grpo", current)
        self.next(self.evaluate)

    @step
    def rloo(self):
        """RLOO: REINFORCE with a leave-one-out baseline over each prompt's samples, KL to SFT in the reward."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "rloo", current)
        self.next(self.evaluate)

    @step
    def kto(self):
        """KTO: a fresh LoRA adapter on the merged SFT model, trained on answers labelled desirable or not."""
        from rlhf_lib import pipeline

        pipeline.method_step(self, "kto", current)
        self.next(self.evaluate)

    # ---------------------------------------------------------------- judging

    @card(type="blank")
    @step
    def evaluate(self, inputs):
        """Compare SFT and every method on held-out prompts, by proxy and gold judge; draw the card."""
        from rlhf_lib import pipeline, report

        self.merge_artifacts(inputs)
        for key, value in pipeline.evaluate(self, current).items():
            setattr(self, key, value)
        report.build_evaluate_card(current.card, self)
        self.next(self.end)

    @step
    def end(self):
        """Remove what no artifact references (failed attempts' outputs); say where everything is."""
        from rlhf_lib import pipeline

        pipeline.end(self, current)


if __name__ == "__main__":
    RLHFFlow()
