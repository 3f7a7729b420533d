"""RLHF pipeline library: the stages, the RL math they share, storage and launching.

METAFLOW_PACKAGE_POLICY: Metaflow puts this package in the flow's code package, so a step running in a pod (which
gets only that package) can import it.
"""

import sys

METAFLOW_PACKAGE_POLICY = "include"

# What the project runs on: Linux and macOS (Metaflow has no native Windows support; use WSL2 there), Python 3.11+
# (tomllib, and the typing the code uses). Said once, plainly, instead of an ImportError deep in a stack.
if sys.version_info < (3, 11):
    raise SystemExit(f"RLHFFlow needs Python 3.11 or newer; this is {sys.version.split()[0]}")
if sys.platform == "win32":
    raise SystemExit("RLHFFlow runs on Linux and macOS (Metaflow does not run on Windows itself): use WSL2")
