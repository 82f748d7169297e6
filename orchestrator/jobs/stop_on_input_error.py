"""A worker's bad-input error ends the job at once instead of being retried.

Ray Train restarts the worker group after any worker failure, up to `cluster.max_failures`
times (forever with -1). That is right for a lost node and pointless for a wrong spec or a
corrupt shard, which fail the same way on every attempt. This callback runs on Ray Train's
controller; raising from it is the public way to make Ray Train stop without a retry. It raises
a ControllerError, which Ray's failure policy does not retry; any other exception would reach
that policy too, but only after Ray logged it with a traceback as an unexpected error.
"""
from __future__ import annotations

from ray.train import ControllerError, UserCallback


class WorkerInputError(ValueError):
    """A worker failed on its input (the spec against its hardware, or the data)."""


def worker_input_errors() -> tuple[type[Exception], ...]:
    """Errors a worker raises when its input is wrong: the same on every attempt.

    Imported when a worker has failed, not when the controller starts (its start-up counts
    toward every job's time to its first step).
    """
    from workers.checkpointing import ResumeMismatchError
    from workers.data_global import DataPositionError
    from workers.data_stream import CorruptShardError
    from workers.engine import AttentionKernelError, DeepSpeedConfigError, PrecisionError
    from workers.shards import ManifestError

    return (PrecisionError, AttentionKernelError, DeepSpeedConfigError, ManifestError, CorruptShardError,
            DataPositionError, ResumeMismatchError)


class StopOnInputError(UserCallback):
    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        input_errors = worker_input_errors()
        for rank, error in sorted(worker_exceptions.items()):
            if isinstance(error, input_errors):
                raise ControllerError(WorkerInputError(f"worker {rank}: {error}"))


def input_error_of(fit_error: BaseException) -> WorkerInputError | None:
    """The WorkerInputError that ended a `trainer.fit()`, if that is what ended it."""
    failure = getattr(fit_error, "controller_failure", None)
    return failure if isinstance(failure, WorkerInputError) else None
