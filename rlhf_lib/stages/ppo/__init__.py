"""PPO for language models, written here: trl removed its PPOTrainer in 1.13 and no TRL PPO ever resumed.

rollout.py generates and scores, losses.py holds the math, trainer.py the loop, checkpoints and resume.
"""
