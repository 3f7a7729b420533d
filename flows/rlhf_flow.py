"""RLHFFlow: a pretrained causal LM through SFT (QLoRA), merge, reward modelling and alignment.

Steps:
    start   validate the config and check, in seconds, that every model and dataset can be reached
    data    materialise each dataset split as a Deep Lake dataset; build the tiny models if configured
    sft     QLoRA supervised fine-tuning of the policy (accelerate subprocess)
    merge   merge the SFT adapter into a full-precision base
    reward  train the reward model on preference pairs (accelerate subprocess)
    ppo     align the policy with our PPO against the reward model under an adaptive KL leash
    evaluate  SFT vs PPO on held-out prompts: reward, win-rate, KL, perplexity, sample generations
    end     print where everything is

Run:     python flows/rlhf_flow.py run
Recipe:  python flows/rlhf_flow.py --config config configs/opt-1.3b.toml run
Resume:  python flows/rlhf_flow.py resume ppo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_lib import env  # noqa: E402

env.configure()  # Metaflow home, user name, W&B mode: before metaflow is imported

from metaflow import Config, FlowSpec, card, current, resources, step  # noqa: E402
from metaflow.exception import MetaflowException  # noqa: E402

from rlhf_lib.config import DEFAULT_CONFIG, ConfigError, parse_toml  # noqa: E402


def parse_config(text: str) -> dict:
    """TOML -> validated config; a bad config stops the CLI with the message alone, before any step runs."""
    try:
        return parse_toml(text)
    except ConfigError as err:
        raise MetaflowException(str(err)) from None


class RLHFFlow(FlowSpec):
    """SFT (QLoRA) -> merge -> reward model -> PPO -> evaluate; see the module docstring for the steps."""

    config = Config("config", default=str(DEFAULT_CONFIG), parser=parse_config,
                    help="TOML run config (configs/tiny.toml by default)")

    @step
    def start(self):
        """Validate the config and every source before anything trains."""
        from rlhf_lib import launch, pipeline, preflight

        cfg = pipeline.config_from_flow(self.config)
        preflight.check_or_raise(cfg)
        self.run_config = cfg.model_dump()
        self.storage_root = str(cfg.storage_root)
        self.gpus_visible = launch.visible_gpus()
        print(f"[start] profile {cfg.run.name}; storage {self.storage_root}; GPUs visible: {self.gpus_visible}")
        self.next(self.data)

    @step
    def data(self):
        """Ingest every dataset split into Deep Lake; resolve (or build) the base models."""
        from rlhf_lib import models, pipeline
        from rlhf_lib.data.ingest import prepare_datasets

        cfg = pipeline.config_from_flow(self.config)
        self.datasets = prepare_datasets(cfg)
        self.policy_base = models.prepare(cfg.policy.model, cfg.policy.tiny, "policy", cfg.storage_root, cfg.run.seed)
        self.reward_base = models.prepare(cfg.reward_model.model, cfg.reward_model.tiny, "reward",
                                          cfg.storage_root, cfg.run.seed)
        print(f"[data] policy base: {self.policy_base}; reward base: {self.reward_base}")
        self.next(self.sft)

    @resources(gpu=config.run.gpus)
    @step
    def sft(self):
        """Supervised fine-tuning with QLoRA."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config)
        result = pipeline.run_stage(cfg, "sft", current.run_id, origin_run_id=current.origin_run_id, inputs={
            "base_model": self.policy_base, "train": self.datasets["sft_train"]["uri"],
            "eval": self.datasets["sft_eval"]["uri"]})
        self.sft_adapter_path = result["adapter_path"]
        self.sft_checkpoint_dir = result["checkpoint_dir"]
        self.sft_metrics = result["metrics"]
        self.sft_config = cfg.sft.model_dump()
        self.next(self.merge)

    @step
    def merge(self):
        """Merge the SFT adapter into a bf16 (GPU) / fp32 (CPU) base."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config)
        result = pipeline.run_stage(cfg, "merge", current.run_id,
                                    {"base_model": self.policy_base, "adapter": self.sft_adapter_path})
        self.sft_merged_path = result["merged_path"]
        self.next(self.reward)

    @resources(gpu=config.run.gpus)
    @step
    def reward(self):
        """Train the reward model on chosen/rejected pairs."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config)
        result = pipeline.run_stage(cfg, "reward", current.run_id, origin_run_id=current.origin_run_id, inputs={
            "base_model": self.reward_base, "train": self.datasets["preference_train"]["uri"],
            "eval": self.datasets["preference_eval"]["uri"]})
        self.reward_model_path = result["model_path"]
        self.reward_checkpoint_dir = result["checkpoint_dir"]
        self.reward_metrics = result["metrics"]
        self.reward_config = cfg.reward.model_dump()
        self.next(self.ppo)

    @card(type="blank")
    @resources(gpu=config.run.gpus)
    @step
    def ppo(self):
        """PPO: a fresh LoRA adapter + value head on the merged SFT model, trained against the reward model."""
        from rlhf_lib import pipeline, report

        cfg = pipeline.config_from_flow(self.config)
        result = pipeline.run_stage(cfg, "ppo", current.run_id, origin_run_id=current.origin_run_id, inputs={
            "sft_model": self.sft_merged_path, "reward_model": self.reward_model_path,
            "prompts": self.datasets["prompts_train"]["uri"]})
        self.ppo_model_path = result["model_path"]
        self.ppo_adapter_path = result["adapter_path"]
        self.ppo_checkpoint_dir = result["checkpoint_dir"]
        self.ppo_stats = result["stats"]
        self.ppo_metrics = result["metrics"]
        self.ppo_config = cfg.ppo.model_dump()
        self.ppo_resumed_from_step = result["resumed_from_step"]
        report.build_ppo_card(current.card, self.ppo_stats, cfg.ppo.kl_target, self.ppo_resumed_from_step)
        self.next(self.evaluate)

    @card(type="blank")
    @step
    def evaluate(self):
        """Compare SFT and PPO on held-out prompts and answers; draw the card."""
        from rlhf_lib import pipeline, report

        cfg = pipeline.config_from_flow(self.config)
        result = pipeline.run_stage(cfg, "evaluate", current.run_id, {
            "policy_sft": self.sft_merged_path, "policy_ppo": self.ppo_model_path,
            "reward_model": self.reward_model_path, "prompts": self.datasets["prompts_eval"]["uri"],
            "sft_eval": self.datasets["sft_eval"]["uri"]})
        self.eval_report = result["eval_report"]
        self.eval_samples = result["eval_samples"]
        report.build_evaluate_card(current.card, self)
        self.next(self.end)

    @step
    def end(self):
        """Say where everything is."""
        ppo = self.eval_report["ppo"]
        print("RLHFFlow finished. Outputs:")
        print(f"  SFT adapter        {self.sft_adapter_path}")
        print(f"  SFT merged model   {self.sft_merged_path}")
        print(f"  reward model       {self.reward_model_path} "
              f"(held-out accuracy {self.reward_metrics['eval_accuracy']:.3f})")
        print(f"  PPO model          {self.ppo_model_path}")
        print(f"  evaluation         PPO vs SFT win-rate {ppo['win_rate_vs_sft']:.2f}, mean score "
              f"{self.eval_report['sft']['mean_score']:.2f} -> {ppo['mean_score']:.2f}, "
              f"KL {ppo['kl_vs_sft_per_sequence']:.2f} nats/sequence")


if __name__ == "__main__":
    RLHFFlow()
