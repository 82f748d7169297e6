"""Reading one JSON object from user-supplied text, with errors that say where and what was expected."""
from __future__ import annotations

import json
from typing import Any


def json_object(text: str, where: str, error: type[Exception], expected: str = "a JSON object") -> dict[str, Any]:
    """Parse `text` as one JSON object; a failure raises `error` naming `where` (file, file:line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                    f"expected {expected}") from exc
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value
