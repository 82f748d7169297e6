import re
from pathlib import Path

import model

MODEL_DIR = Path(model.__file__).parent


def test_reexports():
    import model.generate  # noqa: F401  (the submodule must not shadow the function)
    from model import generate

    assert callable(generate) and generate.__module__ == "model.generate"
    for name in model.__all__:
        assert getattr(model, name) is not None


def test_no_distributed_framework_imports():
    pattern = re.compile(r"^\s*(import|from)\s+(ray|deepspeed)\b", re.MULTILINE)
    for path in MODEL_DIR.glob("*.py"):
        assert not pattern.search(path.read_text()), path.name
