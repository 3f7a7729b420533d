"""`python -m rlhf_lib.stages.ppo` (and `accelerate launch -m rlhf_lib.stages.ppo`)."""

from rlhf_lib.stages.ppo.trainer import main

if __name__ == "__main__":
    main()
