"""The shape of the code, held by tests: no import circle among `rlhf_lib`'s modules, local-vs-remote branching only
in the storage seam (`storage.py`, `workspace.py`), no function over 60 lines in `rlhf_lib/`, `flows/`, `bench/` or
`tests/`, one module that generates text (the rollout sampler), no dead code vulture can see, and the flow's graph
equal to the method registry (rlhf_lib/methods.py)."""

import ast
from pathlib import Path

from conftest import ROOT

LIB = ROOT / "rlhf_lib"
MAX_FUNCTION_LINES = 60
SEAM = {"storage.py", "workspace.py"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(LIB.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rlhf_lib modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from rlhf_lib import models` names a module; else its parent
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_among_rlhf_lib_modules():
    modules = _modules()
    # A package imports its submodules' parent implicitly; a submodule importing its own package's __init__ is not a
    # circle of ours.
    graph = {name: {t for t in _imports(name, path, set(modules)) if not name.startswith(t + ".")}
             for name, path in modules.items()}
    assert len(graph) > 30 and any(graph.values())  # the walk really found the modules and their imports
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


BRANCHING_CALLS = {"is_remote", "scheme", "split_s3"}


def _remote_branches(path: Path) -> list[str]:
    """Where a file asks whether a place is local or remote: calls of storage's predicates, `.remote` attributes,
    and tests of a string against "s3://"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in BRANCHING_CALLS:
                found.append(f"{path.name}:{node.lineno} {name}()")
            if name == "startswith" and any(isinstance(a, ast.Constant) and str(a.value).startswith("s3")
                                            for a in node.args):
                found.append(f"{path.name}:{node.lineno} startswith(s3)")
        elif isinstance(node, ast.Attribute) and node.attr == "remote":
            found.append(f"{path.name}:{node.lineno} .remote")
    return found


def test_local_versus_remote_is_decided_only_in_the_storage_seam():
    outside = [hit for path in sorted(LIB.rglob("*.py")) if path.name not in SEAM for hit in _remote_branches(path)]
    assert outside == []
    inside = [hit for name in SEAM for hit in _remote_branches(LIB / name)]
    assert inside  # the check sees branching where it is


def _sources() -> list[Path]:
    """The project's Python: the library, the flow, the bench scripts and the tests (not a virtual environment)."""
    return sorted(path for folder in ("rlhf_lib", "flows", "bench", "tests") for path in (ROOT / folder).rglob("*.py")
                  if not any(part.startswith(".venv") for part in path.relative_to(ROOT).parts))


def test_no_function_over_60_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_one_module_generates_text():
    """Every stage samples through the one rollout sampler (rlhf_lib/sampling.py): no other module of the library
    calls a model's `.generate(`."""
    callers = {str(path.relative_to(ROOT)) for path in sorted(LIB.rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate"}
    assert callers == {"rlhf_lib/sampling.py"}


def test_vulture_finds_no_dead_code():
    """`vulture rlhf_lib --min-confidence 80`: nothing but unused imports (a `from __future__` style import that a
    type checker reads)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vulture", "rlhf_lib", "--min-confidence", "80"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    found = [line for line in proc.stdout.splitlines() if "unused import" not in line]
    assert proc.returncode in (0, 3) and found == [], proc.stdout + proc.stderr


def test_each_evaluation_metric_key_is_written_in_one_module():
    """The metric table (rlhf_lib/metrics.py) is the one place a metric's key is spelled: evaluate, the report, the
    guard and the pipeline read it from there."""
    from rlhf_lib import metrics

    keys = {m.key for m in metrics.TABLE}
    spelled: dict[str, set[str]] = {}
    for path in sorted(LIB.rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in keys:
                spelled.setdefault(node.value, set()).add(str(path.relative_to(ROOT)))
    assert set(spelled) == keys and all(where == {"rlhf_lib/metrics.py"} for where in spelled.values()), spelled
