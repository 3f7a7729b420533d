"""The README is read on users' machines: every file it names is in the repository, and every artifact its table
lists is there on a run (a skipped method's too, empty)."""

import re

import pytest

from conftest import ROOT
from rlhf_lib import methods

README = (ROOT / "README.md").read_text()
TOP = ("rlhf_lib/", "configs/", "bench/", "tests/", "docs/", "notebooks/", "flows/", ".metaflowconfig/", ".ci/")


def _named_paths() -> set[str]:
    found = set()
    for token in re.findall(r"`([^`\s]+)`", README):
        token = token.rstrip(".,:;)")
        if token.startswith(TOP) and not any(c in token for c in "<>*…{}") and "RUN_ID" not in token:
            found.add(token.split("::")[0])
    return found


def test_every_repository_path_the_readme_names_exists():
    paths = _named_paths()
    assert len(paths) > 25  # the README really names files
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []
    for name in ("requirements.txt", "requirements-dev.txt", "Dockerfile", "BENCHMARKS.md"):
        assert name in README and (ROOT / name).exists()


def _table_artifacts() -> set[str]:
    table = README.split("| step | what | artifacts |", 1)[1].split("\n\n", 1)[0]
    names = set()
    for row in table.splitlines()[1:]:
        cells = row.split("|")
        if len(cells) < 4:
            continue
        for name in re.findall(r"`([a-z_][a-z0-9_]*)`", cells[3]):
            if name.startswith("m_"):
                names.update(f"{m}_{name[2:]}" for m in methods.names())
            else:
                names.add(name)
    return names


@pytest.mark.slow
def test_every_artifact_in_the_readmes_table_is_on_a_run(flow_run):
    names = _table_artifacts()
    assert {"run_config", "ppo_stats", "dpo_model_path", "grpo_snapshots_dir", "eval_report"} <= names
    data = flow_run.data
    missing = sorted(n for n in names if not hasattr(data, n))
    assert missing == []


def test_the_artifact_table_covers_every_method_of_the_registry():
    names = _table_artifacts()
    for name in methods.names():
        assert {f"{name}_status", f"{name}_model_path", f"{name}_metrics", f"{name}_stats"} <= names, name
