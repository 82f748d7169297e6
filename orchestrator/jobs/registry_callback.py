"""Every checkpoint becomes an MLflow model version while the job trains, not only the last.

Runs on the Ray Train controller (a UserCallback), after Ray has persisted a checkpoint of
every rank, so a version never points at a half-uploaded checkpoint. Registration copies the
serving files into MLflow, so a version outlives keep_last rotation. A tracking failure is
printed and never fails the job: the controller registers the final checkpoint again at the
end if its version is missing.
"""
from __future__ import annotations

from typing import Any

from ray.train import UserCallback


class RegisterEachCheckpoint(UserCallback):
    def __init__(self, run_id: str, model_name: str, tracking_uri: str, env: dict[str, str]) -> None:
        self.run_id, self.model_name, self.tracking_uri = run_id, model_name, tracking_uri
        self.env = env  # S3 endpoint and credentials from the submitting side

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None:
            return
        from infra.s3_endpoint import patched_environ
        from orchestrator.registry.models import register_and_move_aliases
        from orchestrator.ray_runtime import checkpoint_uri

        uri = checkpoint_uri(checkpoint)
        # MLflow draws a progress bar per artifact download; in a job's log that is only noise
        env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **self.env}
        try:
            with patched_environ(env):
                version = register_and_move_aliases(self.run_id, uri, self.model_name, self.tracking_uri,
                                                    (metrics[0] if metrics else {}).get("val/loss"))
            print(f"[gptctl] registered {uri} as {self.model_name} version {version}", flush=True)
        except Exception as error:  # noqa: BLE001 - tracking must never fail training
            print(f"[gptctl] warning: could not register {uri} in MLflow: {error}", flush=True)
