"""PPO for language models, written here: trl removed its PPOTrainer in 1.13 and no TRL PPO ever resumed.

losses.py holds the math; policy.py the LM with its adapter and value head; prompts.py the resumable prompt order;
processes.py the collectives over the stage's processes; trainer.py the update, the loop, checkpoints and resume.
Rollouts come from the one sampler (rlhf_lib/sampling.py).
"""
