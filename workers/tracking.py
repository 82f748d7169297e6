"""MLflow logging from rank 0 of a training job.

The controller owns the run (one run per job); the worker only appends to it by run id.
A tracking failure is reported as a warning and never stops training.
"""
from __future__ import annotations

import logging
import os
import time

from infra.waiting import wait_until

log = logging.getLogger(__name__)


class RunLogger:
    """Buffers step metrics and sends them in batches; a no-op on ranks other than 0.

    While the tracking server is unreachable the metrics stay buffered and go out with the
    next successful flush (the last one is at the end of training)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool, flush_every: int = 10):
        self.enabled = bool(enabled and run_id)
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.flush_every = flush_every
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._client_instance = None
        if self.enabled:
            # fail fast and keep the metrics for the next flush instead of MLflow's minutes of
            # in-request retries, which would stall the training step
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    @property
    def _client(self):
        """Created at the first flush, not before the first step: importing MLflow and opening its
        store takes ~0.8 s of a fresh worker's start, and step metrics carry their own timestamps."""
        if self._client_instance is None:
            from mlflow.tracking import MlflowClient

            self._client_instance = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client_instance

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self._pending.extend((key, float(value), now, step) for key, value in metrics.items())
        if len(self._pending) >= self.flush_every * max(len(metrics), 1):
            self.flush()

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._guarded(lambda: self._client.log_text(self.run_id, text, artifact_file))

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """A JSON table artifact (MLflow's log_table: the UI shows it as a table), sent at once."""
        if self.enabled:
            self._guarded(lambda: self._client.log_table(self.run_id, data, artifact_file))

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            return
        pending, self._pending = self._pending, []
        # MLflow caps a batch at 1000 metrics
        for start in range(0, len(pending), 1000):
            chunk = pending[start : start + 1000]
            if not self._guarded(lambda: self._client.log_batch(self.run_id, metrics=_as_metrics(chunk))):
                self._pending = pending[start:] + self._pending
                return

    def close(self, retry_s: float = 60.0) -> None:
        """Final flush: keep trying for a while so an outage near the end loses nothing."""
        def flushed() -> bool:
            self.flush()
            return not self._pending

        wait_until(flushed, interval_s=2.0, timeout_s=retry_s)
        if self._pending:
            log.warning("MLflow unreachable: %d metric values were not logged", len(self._pending))

    def _guarded(self, action) -> bool:
        try:
            action()
            return True
        except Exception as error:  # noqa: BLE001 - tracking must never kill training
            log.warning("MLflow logging failed (training continues): %s", error)
            return False


def _as_metrics(values: list[tuple[str, float, int, int]]) -> list:
    from mlflow.entities import Metric

    return [Metric(key, value, timestamp, step) for key, value, timestamp, step in values]
