"""RLHFFlow: a pretrained causal LM through SFT (QLoRA), merge, reward modelling and alignment by PPO, DPO and
ReST side by side, judged by the reward model they optimised and by a gold judge none of them saw.

Steps:
    start   validate the config and check, in seconds, that every model and dataset can be reached
    data    materialise each dataset split as a Deep Lake dataset; build the tiny models if configured
    sft     QLoRA supervised fine-tuning of the policy (accelerate subprocess)
    merge   merge the SFT adapter into a full-precision base
    rlaif   (data.preference.source = "ai_feedback") a judge model ranks pairs of SFT answers; else skipped
    reward  train the reward model on preference pairs (and the gold one, when the gold judge is a reward model)
    ppo     our PPO against the reward model under an adaptive KL leash           } branches; a method not in
              (ppo_train: @parallel across run.nodes machines; ppo_join keeps     } run.methods finishes at
              node 0's outcome)                                                   } once, `skipped`
    dpo     DPO on the preference pairs (TRL DPOTrainer, LoRA, SFT as reference)   }
    rest    ReST: Grow samples scored by the reward model, Improve on the best     }
    evaluate  SFT vs every method on held-out prompts: proxy and gold win-rates, KL, perplexity, samples
    end     print where everything is

Run:     python flows/rlhf_flow.py run
Compare: python flows/rlhf_flow.py --config config configs/compare.toml run
Recipe:  python flows/rlhf_flow.py --config config configs/opt-1.3b.toml run
Resume:  python flows/rlhf_flow.py resume ppo
Cluster: python flows/rlhf_flow.py --with kubernetes run   (README: "Run on Kubernetes / AWS Batch / Argo")
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_lib import env  # noqa: E402

env.configure()  # Metaflow home, user name, W&B mode: before metaflow is imported

from metaflow import Config, FlowSpec, card, current, parallel, resources, retry, step  # noqa: E402
from metaflow.exception import MetaflowException  # noqa: E402

from rlhf_lib.config import DEFAULT_CONFIG, ConfigError, parse_toml  # noqa: E402
from rlhf_lib.packaging import ShipProjectFiles  # noqa: E402


def parse_config(text: str) -> dict:
    """TOML -> validated config; a bad config stops the CLI with the message alone, before any step runs."""
    try:
        return parse_toml(text)
    except ConfigError as err:
        raise MetaflowException(str(err)) from None


def stage_resources(config, gpu: bool = True):
    """What a stage step asks of a cluster, from the config: run.gpus GPUs (unless `gpu` is False) and
    resources.cpu / memory_mb / shared_memory_mb."""
    return resources(gpu=config.run.gpus if gpu else 0, cpu=config.resources.cpu,
                     memory=config.resources.memory_mb, shared_memory=config.resources.shared_memory_mb)


def stage_retry(config):
    """A killed or preempted stage task is re-run in the same run; it continues from its own newest checkpoint."""
    return retry(times=config.run.retries, minutes_between_retries=config.run.retry_wait_minutes)


@ShipProjectFiles
class RLHFFlow(FlowSpec):
    """SFT (QLoRA) -> merge -> [AI feedback] -> reward model -> PPO | DPO | ReST -> evaluate; see the docstring."""

    config = Config("config", default=str(DEFAULT_CONFIG), parser=parse_config,
                    help="TOML run config (configs/tiny.toml by default)")

    @step
    def start(self):
        """Validate the config and every source before anything trains."""
        from rlhf_lib import env, launch, pipeline, preflight

        cfg = pipeline.config_from_flow(self.config)
        self.datastore_type = getattr(self._datastore, "TYPE", None)  # the one this run uses (--datastore wins)
        self.storage_root = pipeline.resolve_storage_root(cfg, self.datastore_type)
        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        self.metaflow_config = env.metaflow_config_source()
        print(f"[start] Metaflow config: {self.metaflow_config}; datastore: {self.datastore_type}")
        print(f"[start] stage outputs and checkpoints: {self.storage_root}")
        preflight.check_or_raise(cfg)
        self.run_config = cfg.model_dump()
        self.gpus_visible = launch.visible_gpus()
        print(f"[start] profile {cfg.run.name}; GPUs visible: {self.gpus_visible}")
        self.next(self.data)

    @stage_retry(config)
    @stage_resources(config, gpu=False)
    @step
    def data(self):
        """Ingest every dataset split into Deep Lake; resolve (or build) the base models."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        prepared = pipeline.prepare_data(cfg, current.run_id)
        self.datasets, self.policy_base = prepared["datasets"], prepared["policy_base"]
        self.reward_base = prepared["reward_base"]
        print(f"[data] policy base: {self.policy_base}; reward base: {self.reward_base}")
        self.next(self.sft)

    @stage_retry(config)
    @stage_resources(config)
    @step
    def sft(self):
        """Supervised fine-tuning with QLoRA."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        result = pipeline.run_stage(cfg, "sft", current.run_id, origin_run_id=current.origin_run_id, inputs={
            "base_model": self.policy_base, "train": self.datasets["sft_train"]["uri"],
            "eval": self.datasets["sft_eval"]["uri"]})
        self.sft_adapter_path = result["adapter_path"]
        self.sft_checkpoint_dir = result["checkpoint_dir"]
        self.sft_metrics = result["metrics"]
        self.sft_config = cfg.sft.model_dump()
        self.next(self.merge)

    @stage_retry(config)
    @stage_resources(config)
    @step
    def merge(self):
        """Merge the SFT adapter into a bf16 (GPU) / fp32 (CPU) base."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        result = pipeline.run_stage(cfg, "merge", current.run_id,
                                    {"base_model": self.policy_base, "adapter": self.sft_adapter_path})
        self.sft_merged_path = result["merged_path"]
        self.next(self.rlaif)

    @stage_retry(config)
    @stage_resources(config)
    @step
    def rlaif(self):
        """AI feedback: a judge model ranks pairs of SFT answers under the constitution (when configured)."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        self.rlaif_status = pipeline.SKIPPED
        self.rlaif_metrics = {}
        if pipeline.uses_ai_feedback(cfg):
            result = pipeline.run_stage(cfg, "rlaif", current.run_id, {
                "sft_model": self.sft_merged_path, "judge_model": pipeline.judge_ref(cfg.rlaif.judge_model,
                                                                                       self.policy_base),
                "prompts": self.datasets["prompts_train"]["uri"]})
            self.datasets = {**self.datasets, "preference_train": {**result["train"], "source": "ai_feedback"},
                             "preference_eval": {**result["eval"], "source": "ai_feedback"}}
            self.rlaif_status, self.rlaif_metrics = "done", result["metrics"]
        self.next(self.reward)

    @stage_retry(config)
    @stage_resources(config)
    @step
    def reward(self):
        """Train the reward model on chosen/rejected pairs (and the gold judge's, on the other half)."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        proxy, gold = pipeline.reward_models(cfg, current.run_id, current.origin_run_id, {
            "base_model": self.reward_base, "train": self.datasets["preference_train"]["uri"],
            "eval": self.datasets["preference_eval"]["uri"]})
        self.reward_model_path = proxy["model_path"]
        self.reward_checkpoint_dir = proxy["checkpoint_dir"]
        self.reward_metrics = proxy["metrics"]
        self.reward_config = cfg.reward.model_dump()
        self.gold_reward_model_path = gold["model_path"] if gold else None
        self.gold_reward_metrics = gold["metrics"] if gold else {}
        self.next(self.ppo, self.dpo, self.rest)

    @step
    def ppo(self):
        """Gang the PPO stage across run.nodes machines (one when run.nodes = 1, or when PPO is not in run.methods)."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        self.next(self.ppo_train, num_parallel=cfg.run.nodes if "ppo" in cfg.run.methods else 1)

    @stage_retry(config)
    @stage_resources(config)
    @parallel
    @step
    def ppo_train(self):
        """PPO: a fresh LoRA adapter + value head on the merged SFT model, trained against the reward model; with
        several nodes one torch.distributed job (rendezvous at current.parallel's main node), node 0 reporting."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        if current.parallel.node_index == 0:
            self.ppo_status, self.ppo_model_path, self.ppo_stats, self.ppo_seconds = pipeline.SKIPPED, None, [], None
            self.ppo_config = cfg.ppo.model_dump()
        if pipeline.method_enabled(cfg, "ppo"):
            nodes = pipeline.Nodes.of(current.parallel, current.run_id)
            result = pipeline.run_stage(cfg, "ppo", current.run_id, origin_run_id=current.origin_run_id, inputs={
                "sft_model": self.sft_merged_path, "reward_model": self.reward_model_path,
                "prompts": self.datasets["prompts_train"]["uri"]}, nodes=nodes)
            if current.parallel.node_index == 0:  # the rank that writes results and checkpoints
                self.ppo_status, self.ppo_seconds = "done", result["seconds"]
                self.ppo_model_path = result["model_path"]
                self.ppo_adapter_path = result["adapter_path"]
                self.ppo_checkpoint_dir = result["checkpoint_dir"]
                self.ppo_stats = result["stats"]
                self.ppo_metrics = result["metrics"]
                self.ppo_resumed_from_step = result["resumed_from_step"]
        self.next(self.ppo_join)

    @card(type="blank")
    @step
    def ppo_join(self, inputs):
        """Close the PPO gang: node 0's outcome (only it sets the ppo_* artifacts) and the PPO card."""
        from rlhf_lib import report

        self.merge_artifacts(inputs)
        if self.ppo_status == "done":
            report.build_ppo_card(current.card, self.ppo_stats, self.ppo_config["kl_target"],
                                  self.ppo_resumed_from_step)
        else:
            report.build_skipped_card(current.card, "ppo")
        self.next(self.evaluate)

    @stage_retry(config)
    @stage_resources(config)
    @step
    def dpo(self):
        """DPO: a fresh LoRA adapter on the merged SFT model, trained on the preference pairs directly."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        self.dpo_status, self.dpo_model_path, self.dpo_seconds = pipeline.SKIPPED, None, None
        self.dpo_config = cfg.dpo.model_dump()
        if pipeline.method_enabled(cfg, "dpo"):
            result = pipeline.run_stage(cfg, "dpo", current.run_id, origin_run_id=current.origin_run_id, inputs={
                "sft_model": self.sft_merged_path, "train": self.datasets["preference_train"]["uri"],
                "eval": self.datasets["preference_eval"]["uri"]})
            self.dpo_status, self.dpo_seconds = "done", result["seconds"]
            self.dpo_model_path = result["model_path"]
            self.dpo_adapter_path = result["adapter_path"]
            self.dpo_checkpoint_dir = result["checkpoint_dir"]
            self.dpo_metrics = result["metrics"]
        self.next(self.evaluate)

    @stage_retry(config)
    @stage_resources(config)
    @step
    def rest(self):
        """ReST: Grow a scored dataset from the policy, Improve on the samples above a rising threshold."""
        from rlhf_lib import pipeline

        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        self.rest_status, self.rest_model_path, self.rest_seconds = pipeline.SKIPPED, None, None
        self.rest_config = cfg.rest.model_dump()
        if pipeline.method_enabled(cfg, "rest"):
            result = pipeline.run_stage(cfg, "rest", current.run_id, origin_run_id=current.origin_run_id, inputs={
                "sft_model": self.sft_merged_path, "reward_model": self.reward_model_path,
                "prompts": self.datasets["prompts_train"]["uri"]})
            self.rest_status, self.rest_seconds = "done", result["seconds"]
            self.rest_model_path = result["model_path"]
            self.rest_adapter_path = result["adapter_path"]
            self.rest_checkpoint_dir = result["checkpoint_dir"]
            self.rest_iterations = result["iterations"]
            self.rest_grown_sets = result["grown_sets"]
            self.rest_metrics = result["metrics"]
        self.next(self.evaluate)

    @card(type="blank")
    @stage_retry(config)
    @stage_resources(config)
    @step
    def evaluate(self, inputs):
        """Compare SFT and every method on held-out prompts and answers, by proxy and gold judge; draw the card."""
        from rlhf_lib import pipeline, report

        self.merge_artifacts(inputs)
        cfg = pipeline.config_from_flow(self.config, self.storage_root)
        methods = [m for m in cfg.run.methods if getattr(self, f"{m}_status") == "done"]
        policies = {"policy_sft": self.sft_merged_path, **{f"policy_{m}": getattr(self, f"{m}_model_path")
                                                           for m in methods}}
        if self.gold_reward_model_path:
            policies["gold_reward_model"] = self.gold_reward_model_path
        result = pipeline.run_stage(cfg, "evaluate", current.run_id, {
            **policies, "reward_model": self.reward_model_path, "prompts": self.datasets["prompts_eval"]["uri"],
            "sft_eval": self.datasets["sft_eval"]["uri"]})
        self.methods = methods
        self.gold_judge = result["gold_judge"]
        self.eval_report = pipeline.add_stage_seconds(result["eval_report"],
                                                      {m: getattr(self, f"{m}_seconds") for m in methods})
        self.eval_samples = result["eval_samples"]
        report.build_evaluate_card(current.card, self)
        self.next(self.end)

    @step
    def end(self):
        """Say where everything is."""
        from rlhf_lib import report

        print(report.summary(self))


if __name__ == "__main__":
    RLHFFlow()
