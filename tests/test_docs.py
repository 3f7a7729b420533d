"""The README and docs/ are read on users' machines, so what they name must be true: every file they name is in
the repository, every config key they name exists (and where they state its default, that is the default), the
config reference is the schema's, the quick start's commands are what CI and the tests run, and every artifact
the docs' table lists is there on a run."""

import re

import pytest

from conftest import ROOT, readme_run_command
from rlhf_lib import config, methods

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("rlhf_lib/", "configs/", "bench/", "tests/", "docs/", "notebooks/", "flows/", ".metaflowconfig/", ".ci/")
KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
FILE_SUFFIXES = {"py", "toml", "md", "json", "jsonl", "txt", "png", "sh", "yaml", "gz", "bin", "safetensors", "parquet",
                 "ipynb", "log"}


def _text(path) -> str:
    return path.read_text()


def code_spans(text: str) -> list[str]:
    """The inline code of a markdown page (`x` and ``x``), line by line, outside fenced blocks."""
    spans, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            spans += [a or b for a, b in re.findall(r"``(.+?)``|`([^`]+)`", line)]
    return spans


def _named_paths(text: str) -> set[str]:
    found = set()
    for token in (t for t in code_spans(text) if not re.search(r"\s", t)):
        token = token.rstrip(".,:;)")
        if token.startswith(TOP) and not any(c in token for c in "<>*…{}") and "RUN_ID" not in token:
            found.add(token.split("::")[0])
    return found


def _linked_paths(path) -> set:
    """Markdown links and images to files of the repository, resolved from the page's folder."""
    return {(path.parent / target).resolve() for target in re.findall(r"\]\(([^)#\s]+)\)", _text(path))
            if "://" not in target}


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for page in DOCS:
        paths = _named_paths(_text(page))
        missing += [f"{page.name}: {p}" for p in sorted(paths) if not (ROOT / p).exists()]
        missing += [f"{page.name}: {p}" for p in sorted(_linked_paths(page)) if not p.exists()]
    assert len(_named_paths(_text(DOCS[0]))) > 10  # the README really names files
    assert missing == []


def test_a_removed_path_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See `rlhf_lib/no_such_module.py` and ![plot](no-such.png).")
    assert not (ROOT / "rlhf_lib/no_such_module.py").exists() and _named_paths(_text(page))
    assert not all(p.exists() for p in _linked_paths(page))


# ------------------------------------------------------------------ config keys and their stated defaults

def _schema_keys() -> dict[str, str]:
    return {key: default for key, default, _ in config.reference_rows()}


def _section_names() -> set[str]:
    """Every name a section of the config has, at any depth (`run`, `sft`, `lora`, `tiny`, `preference`...)."""
    return {key.rsplit(".", 1)[-1] for key, default, _ in config.reference_rows() if default == "(section)"}


def named_keys(text: str) -> set[str]:
    """Backticked dotted names that read as config keys: `ppo.batch_size`, `sft.lora = {...}`, and keys named
    without their section, such as `lora.target_modules` (which the schema cannot have at the top level)."""
    sections = _section_names()
    found = set()
    for token in code_spans(text):
        name = token.split(" = ", 1)[0].strip()
        if KEY.match(name) and name.split(".")[0] in sections and name.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            found.add(name)
    return found


def stated_defaults(text: str) -> dict[str, str]:
    """`key` (default V) and `key` (V by default): what the page says a key's default is."""
    pattern = re.compile(r"`([a-z][a-z0-9_.]+)`\s*\((?:default `?([^`),;]+?)`?|`?([^`),;]+?)`? by default)[),;]")
    return {m.group(1): (m.group(2) or m.group(3)).strip() for m in pattern.finditer(text)}


def _same_default(stated: str, actual: str) -> bool:
    return stated.strip('"') == actual.strip('"')


def test_every_config_key_the_docs_name_exists_with_its_stated_default():
    keys = _schema_keys()
    problems = []
    for page in DOCS:
        text = _text(page)
        problems += [f"{page.name}: `{k}` is not a config key" for k in sorted(named_keys(text)) if k not in keys]
        problems += [f"{page.name}: `{k}` default stated {v!r}, schema {keys.get(k)!r}"
                     for k, v in stated_defaults(text).items() if k in keys and not _same_default(v, keys[k])]
    assert sum(len(named_keys(_text(p))) for p in DOCS) > 50  # the docs really name keys
    assert problems == []


def test_a_wrong_key_or_default_is_caught():
    text = "Set `lora.target_modules`, `run.no_such_key` and `run.retries` (default 7); `dpo.beta` (0.1 by default)."
    keys = _schema_keys()
    assert {"lora.target_modules", "run.no_such_key"} <= {k for k in named_keys(text) if k not in keys}
    stated = stated_defaults(text)
    assert not _same_default(stated["run.retries"], keys["run.retries"])
    assert _same_default(stated["dpo.beta"], keys["dpo.beta"])


def test_the_config_reference_is_the_schemas():
    page = _text(ROOT / "docs" / "configuration.md")
    copy = page[page.index(config.REFERENCE_BEGIN):page.index(config.REFERENCE_END) + len(config.REFERENCE_END)]
    assert copy + "\n" == config.reference_markdown(), "docs/configuration.md is stale: python -m rlhf_lib.config " \
                                                        "--reference, and paste it in place"


# ------------------------------------------------------------------ the quick start's commands

def _quick_start_blocks() -> list[str]:
    section = _text(ROOT / "README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0].strip() for block in section.split("```bash\n")[1:]]


def test_the_quick_start_is_on_the_first_screen_and_the_readme_is_short():
    readme = _text(ROOT / "README.md").splitlines()
    assert len(readme) <= 250
    first = "\n".join(readme[:60])
    assert "## Quick start" in first and "python flows/rlhf_flow.py run" in first and "pytest" in first
    assert "card view evaluate" in first or "## What you will see" in first


def test_the_quick_start_commands_are_what_ci_and_the_tests_run():
    install_and_run, test = _quick_start_blocks()[:2]
    ci = _text(ROOT / ".ci" / "run")
    # CI sets up the way the README says (a fresh venv) and runs the README's test line as it is.
    assert install_and_run.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    assert test in ci.splitlines(), f"{test!r} is not a line of .ci/run"
    # The run: the shared flow fixture runs the README's own command (tests/conftest.py, flow_run).
    assert readme_run_command() == install_and_run.split(" && ")[-1] == "python flows/rlhf_flow.py run"
    assert "python -m rlhf_lib.install" in install_and_run


# ------------------------------------------------------------------ the artifact table

def _table_artifacts() -> set[str]:
    table = _text(ROOT / "docs" / "inspecting.md").split("| step | what | artifacts |", 1)[1].split("\n\n", 1)[0]
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
def test_every_artifact_in_the_docs_table_is_on_a_run(flow_run):
    names = _table_artifacts()
    assert {"run_config", "ppo_stats", "dpo_model_path", "grpo_snapshots_dir", "eval_report"} <= names
    data = flow_run.data
    missing = sorted(n for n in names if not hasattr(data, n))
    assert missing == []


def test_the_artifact_table_covers_every_method_of_the_registry():
    names = _table_artifacts()
    for name in methods.names():
        assert {f"{name}_status", f"{name}_model_path", f"{name}_metrics", f"{name}_stats",
                f"{name}_recommended_step"} <= names, name
