"""What travels with the flow to a pod: Metaflow's code package holds the flow file and `rlhf_lib` (its
METAFLOW_PACKAGE_POLICY); `ShipProjectFiles` adds the project files stages read at run time (`configs/`: the
constitution, the profiles), at the same place relative to `rlhf_lib` as in the checkout."""

from __future__ import annotations

from metaflow import FlowMutator
from metaflow.packaging_sys import ContentType

from rlhf_lib.env import PROJECT_ROOT

SHIPPED_DIRS = ("configs",)


def shipped_files() -> list[tuple[str, str]]:
    """(local path, path in the package's code directory) of every project file a pod needs besides code."""
    return [(str(path), str(path.relative_to(PROJECT_ROOT)))
            for top in SHIPPED_DIRS for path in sorted((PROJECT_ROOT / top).rglob("*")) if path.is_file()]


class ShipProjectFiles(FlowMutator):
    """Flow decorator: add `configs/` to the code package, beside `rlhf_lib` (`PROJECT_ROOT` in a pod)."""

    def add_to_package(self):
        return [(path, arcname, ContentType.CODE_CONTENT) for path, arcname in shipped_files()]
