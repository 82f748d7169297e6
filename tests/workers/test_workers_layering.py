"""workers/ runs on every training node and must not need the orchestrator (CLI, Serve, registry)."""
from __future__ import annotations

import ast
from pathlib import Path

WORKERS = Path(__file__).resolve().parents[2] / "workers"


def test_workers_import_nothing_from_orchestrator():
    offenders = []
    for path in sorted(WORKERS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(WORKERS)}:{node.lineno} imports {name}" for name in names
                          if name == "orchestrator" or name.startswith("orchestrator.")]
    assert not offenders, offenders


INFRA = WORKERS.parent / "infra"
ORCHESTRATOR = WORKERS.parent / "orchestrator"
# orchestrator/ imports only go down this list (cli → jobs/eval → serve → registry/data → shared
# modules); within one subpackage, anything goes
ORCHESTRATOR_LAYERS = {"cli": 4, "jobs": 3, "eval": 3, "serve": 2, "registry": 1, "data": 1,
                       "spec": 0, "spec_docs": 0, "runs": 0, "ray_runtime": 0, "stack": 0}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, lazy (inside functions) ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}" if module == "orchestrator" else module)
                      for alias in node.names]
    return found


def test_infra_imports_nothing_of_gptctl():
    """infra/ starts services and Ray nodes for any gptctl version, so it needs none of its code."""
    offenders = [f"{path.relative_to(INFRA)}:{line} imports {name}"
                 for path in sorted(INFRA.rglob("*.py")) for line, name in _imports(path)
                 if name.split(".")[0] in ("orchestrator", "workers", "model")]
    assert not offenders, offenders


def test_orchestrator_imports_only_go_down():
    offenders = []
    for path in sorted(ORCHESTRATOR.rglob("*.py")):
        part = path.relative_to(ORCHESTRATOR).parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] != "orchestrator" or len(parts) < 2:
                continue
            target, here = ORCHESTRATOR_LAYERS[parts[1]], ORCHESTRATOR_LAYERS[part]
            if parts[1] != part and (target > here or target == here > 0):  # shared modules may share
                offenders.append(f"{path.relative_to(ORCHESTRATOR)}:{line} imports {name}")
    assert not offenders, offenders
