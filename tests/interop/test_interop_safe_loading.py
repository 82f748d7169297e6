"""Weights are read only from safetensors: a pickle disguised as a checkpoint is refused with a
clear error by every export/import/load path, and its payload never runs."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from interop_testutil import write_pickle_payload

from model import load_pretrained
from model.hf import UnsafeCheckpointError
from orchestrator.registry.export import consolidate_deepspeed, export_hf, import_hf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["pickle", "torch.save"])
def kind(request):
    return request.param


def _poisoned_copy(source: Path, tmp_path: Path, name: str, kind: str) -> tuple[Path, Path]:
    directory, marker = tmp_path / "poisoned", tmp_path / "MARKER"
    shutil.copytree(source, directory)
    write_pickle_payload(directory / name, marker, kind)
    return directory, marker


def test_export_refuses_pickled_weights(tmp_path, checkpoint, kind):
    directory, marker = _poisoned_copy(checkpoint, tmp_path, "model.safetensors", kind)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        export_hf(str(directory), str(tmp_path / "hf"))
    assert not marker.exists()
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_serving_and_finetune_loader_refuses_pickled_weights(tmp_path, checkpoint, kind):
    """load_pretrained is what Serve replicas, the MLflow pyfunc and fine-tuning workers call."""
    directory, marker = _poisoned_copy(checkpoint, tmp_path, "model.safetensors", kind)
    with pytest.raises(ValueError, match="pickle"):
        load_pretrained(directory)
    assert not marker.exists()


def test_import_refuses_pickled_safetensors(tmp_path, checkpoint, kind):
    hf = tmp_path / "hf"
    export_hf(str(checkpoint), str(hf))
    directory, marker = _poisoned_copy(hf, tmp_path, "model.safetensors", kind)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        import_hf(str(directory), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_import_refuses_pytorch_model_bin(tmp_path, checkpoint, kind):
    hf = tmp_path / "hf"
    export_hf(str(checkpoint), str(hf))
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    write_pickle_payload(hf / "pytorch_model.bin", marker, kind)
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin.*safetensors"):
        import_hf(str(hf), str(tmp_path / "out"))
    assert not marker.exists()


def test_import_refuses_pickle_only_dir_on_s3(s3_endpoint, tmp_path, checkpoint):
    from workers import storage

    hf = tmp_path / "hf"
    export_hf(str(checkpoint), str(hf))
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    write_pickle_payload(hf / "pytorch_model.bin", marker, "torch.save")
    storage.ensure_bucket("s3://interop-safe")
    storage.upload_dir(str(hf), "s3://interop-safe/hf")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        import_hf("s3://interop-safe/hf", str(tmp_path / "out"))
    assert not marker.exists()


def test_deepspeed_consolidation_refuses_pickle_payload(tmp_path, kind):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    (ckpt / "deepspeed").mkdir(parents=True)
    (ckpt / "deepspeed" / "latest").write_text("step_1")
    write_pickle_payload(ckpt / "deepspeed" / "step_1" / "mp_rank_00_model_states.pt", marker, kind)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        consolidate_deepspeed(str(ckpt), str(tmp_path / "out"))
    assert not marker.exists()


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == "torch":
                yield node


def test_every_torch_load_in_the_repo_is_weights_only():
    """Guard: a new torch.load anywhere in the project must pass weights_only=True literally."""
    offenders = []
    for folder in ("model", "workers", "orchestrator", "infra", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for call in _torch_load_calls(path):
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in call.keywords)
                if not ok:
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
