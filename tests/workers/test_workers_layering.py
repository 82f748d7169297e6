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
