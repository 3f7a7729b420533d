"""The pipeline's stages: one module each, every one runnable alone (`python -m rlhf_lib.stages.<stage>`).

A stage process sets the environment the project relies on (Metaflow home, W&B mode, tokenizers' threads, no hub
telemetry) before any ML library is imported: here, since every stage module is imported through this package.
"""

from rlhf_lib import env

env.configure()
