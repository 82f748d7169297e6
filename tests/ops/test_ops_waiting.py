"""infra.waiting.wait_until: the one wait/retry loop every service wait goes through."""
from __future__ import annotations

import pytest

from infra.waiting import wait_until


def test_returns_the_first_result_that_is_done():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls), interval_s=0.01, timeout_s=5,
                      done=lambda n: n >= 3) == 3


def test_give_up_names_what_did_not_answer():
    with pytest.raises(TimeoutError, match="x did not answer"):
        wait_until(lambda: False, interval_s=0.01, timeout_s=0.05, give_up=lambda _: TimeoutError("x did not answer"))


def test_without_give_up_the_last_result_or_retried_error_comes_back():
    assert wait_until(lambda: "RUNNING", interval_s=0.01, timeout_s=0.05, done=lambda s: s == "STOPPED") == "RUNNING"

    def missing():
        raise LookupError("no run yet")

    with pytest.raises(LookupError, match="no run yet"):
        wait_until(missing, interval_s=0.01, timeout_s=0.05, done=lambda _: True, retry_on=(LookupError,))


def test_attempts_bound_the_calls_and_the_last_error_reaches_give_up():
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(RuntimeError, match=r"^gone \(refused\)$"):
        wait_until(refused, interval_s=0.01, attempts=3, done=lambda _: True, retry_on=(ConnectionError,),
                   give_up=lambda error: RuntimeError(f"gone ({error})"))
    assert len(calls) == 3


def test_an_error_that_is_not_retried_ends_the_wait_at_once():
    calls = []

    def exited():
        calls.append(1)
        raise RuntimeError("service exited with code 1 before answering")

    with pytest.raises(RuntimeError, match="exited with code 1"):
        wait_until(exited, interval_s=0.01, timeout_s=5)
    assert len(calls) == 1
