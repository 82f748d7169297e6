"""A worker's bad-input error stops the job instead of being retried (the Ray run: tests/workers)."""
from __future__ import annotations

import pickle
import re

import pytest
from ray.train import ControllerError

from orchestrator.jobs.stop_on_input_error import StopOnInputError, WorkerInputError, input_error_of
from workers.data_stream import CorruptShardError
from workers.engine import DeepSpeedConfigError, PrecisionError
from workers.storage import StorageError


@pytest.mark.parametrize("error", [
    PrecisionError("train.precision: fp16 is not supported on the cpu accelerator"),
    CorruptShardError("s3://b/shard-00001.tar", 1024, "000003", "sha256 mismatch"),
    DeepSpeedConfigError("train.deepspeed: zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"),
])
def test_input_errors_stop_the_job(error):
    with pytest.raises(ControllerError) as stopped:
        StopOnInputError().after_exception(None, {0: RuntimeError("peer went away"), 1: error})
    assert isinstance(input_error_of(stopped.value), WorkerInputError)
    message = str(input_error_of(stopped.value))
    assert re.match(r"worker 1: .*(train\.precision|shard-00001\.tar|train\.deepspeed)", message)


@pytest.mark.parametrize("error", [RuntimeError("NCCL timeout"), StorageError("s3://b: connection reset"),
                                   MemoryError()])
def test_other_errors_are_left_to_max_failures(error):
    StopOnInputError().after_exception(None, {0: error})  # no raise: Ray Train retries as configured


def test_a_corrupt_shard_error_survives_the_trip_from_worker_to_controller():
    """Ray pickles a worker's exception; a class that cannot be rebuilt would reach the controller
    as something else and be retried."""
    error = pickle.loads(pickle.dumps(CorruptShardError("s3://b/s.tar", 7, None, "truncated")))
    assert isinstance(error, CorruptShardError)
    assert (error.shard, error.offset, error.member, error.reason) == ("s3://b/s.tar", 7, None, "truncated")


def test_input_error_of_reads_the_controller_failure():
    stop = WorkerInputError("worker 0: bad")
    assert input_error_of(ControllerError(stop)) is stop
    assert input_error_of(ControllerError(ValueError("other"))) is None
    assert input_error_of(RuntimeError("no controller failure")) is None
