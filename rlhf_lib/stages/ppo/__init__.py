"""PPO for language models, written here: trl removed its PPOTrainer in 1.13 and no TRL PPO ever resumed.

losses.py holds the math, trainer.py the loop, checkpoints and resume; rollouts come from the one sampler
(rlhf_lib/sampling.py).
"""
