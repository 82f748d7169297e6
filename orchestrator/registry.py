"""Checkpoints as MLflow registered model versions.

The model is logged "from code" (orchestrator/pyfunc_model.py) with the checkpoint's serving
files as artifacts, so `mlflow.pyfunc.load_model("models:/NAME/1")` generates text and the
weights stay plain safetensors: nothing in the registry is unpickled.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from workers import storage

SERVING_FILES = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json")
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def register_checkpoint(run_id: str, checkpoint_uri: str, model_name: str, tracking_uri: str) -> int:
    """Log the checkpoint's serving files under the run and register them; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gptctl-register-") as staging:
        local = Path(staging, "checkpoint")  # the artifact keeps this directory's name
        local.mkdir()
        for name in SERVING_FILES:
            storage.download_file(storage.join(checkpoint_uri, name), str(local / name))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={"checkpoint": str(local)},
                code_paths=None,
                pip_requirements=["torch>=2.4", "tokenizers", "safetensors", "mlflow"],
                registered_model_name=model_name,
            )
    return int(info.registered_model_version)
