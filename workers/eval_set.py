"""Reading an eval set: the prompt/response pairs a fine-tune's answers are scored against.

Apart from workers/task_eval.py (which needs torch) so `gptctl validate` checks the file cheaply.
"""
from __future__ import annotations

from workers import storage
from workers.json_input import json_object

__all__ = ["EvalSetError", "read_eval_set"]


class EvalSetError(ValueError):
    """An eval set that cannot be scored; the message names the file (and line) and what was expected."""


def read_eval_set(uri: str, limit: int | None = None) -> list[dict[str, str]]:
    """The first ``limit`` (all if None) ``{"prompt", "response"}`` pairs of a .jsonl file, local or
    s3://; every line is checked, so a bad row is refused before any job starts, not mid-run."""
    if not storage.exists(uri):
        raise EvalSetError(f"{uri}: file not found (expected a .jsonl file of {{\"prompt\", \"response\"}} lines)")
    pairs: list[dict[str, str]] = []
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{uri}:{lineno}"
        record = json_object(line, where, EvalSetError, expected='one JSON object per line: {"prompt": ..., "response": ...}')
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                got = "no" if key not in record else f"a {type(record[key]).__name__} as its"
                raise EvalSetError(f'{where}: row has {got} "{key}"; expected a string "prompt" and the expected '
                                   f'answer as a string "response" (got keys {sorted(record)})')
        pairs.append({"prompt": record["prompt"], "response": record["response"]})
    if not pairs:
        raise EvalSetError(f'{uri}: no rows (expected one {{"prompt": ..., "response": ...}} object per line)')
    return pairs[:limit] if limit else pairs
