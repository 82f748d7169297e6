"""The one way gptctl waits for something: a service to answer, a run to appear, a job to end.

Every caller used to hand-write its own deadline/sleep loop; they differed only in what they
probe, how often, for how long and what they say when the time is up, so those four are the
parameters here and the loop itself is tenacity's. It lives in infra/ (shipped to every node
with the job's code) and imports nothing of gptctl, so infra/, orchestrator/ and workers/ (which
must not import orchestrator/) may all use it.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import tenacity

T = TypeVar("T")

__all__ = ["wait_until"]


def wait_until(probe: Callable[[], T], *, interval_s: float, timeout_s: float | None = None,
               attempts: int | None = None, done: Callable[[T], bool] = bool,
               retry_on: tuple[type[BaseException], ...] = (),
               give_up: Callable[[BaseException | None], BaseException] | None = None) -> T:
    """Call ``probe`` every ``interval_s`` until ``done(result)``; return that result.

    An exception from ``probe`` that is one of ``retry_on`` counts as "not yet"; any other
    propagates at once (e.g. "the process we wait for has exited"). The wait ends after
    ``timeout_s`` seconds and/or ``attempts`` calls, whichever comes first; the probe is always
    called at least once. Then, with ``give_up``, it raises ``give_up(last retried error or None)``;
    without, it re-raises the last retried error, or returns the last result (the caller decides
    what a result that is not done yet means, e.g. a job status that is not terminal)."""
    stop = tenacity.stop_never
    if timeout_s is not None:
        stop = stop | tenacity.stop_after_delay(timeout_s)
    if attempts is not None:
        stop = stop | tenacity.stop_after_attempt(attempts)

    def out_of_time(state: tenacity.RetryCallState) -> T:
        error = state.outcome.exception()
        if give_up is not None:
            raise give_up(error)
        return state.outcome.result()  # re-raises a retried error, else the last result

    retrying = tenacity.Retrying(
        stop=stop, wait=tenacity.wait_fixed(interval_s),
        retry=tenacity.retry_if_exception_type(retry_on) | tenacity.retry_if_result(lambda value: not done(value)),
        retry_error_callback=out_of_time,
    )
    return retrying(probe)
