"""RLHF pipeline library: the stages, the RL math they share, storage and launching.

METAFLOW_PACKAGE_POLICY: Metaflow puts this package in the flow's code package, so a step running in a pod (which
gets only that package) can import it.
"""

METAFLOW_PACKAGE_POLICY = "include"
