"""Fuzzing, load and SIGTERM under load against a real server: short runs here, long ones slow.

`python -m tests.stress` runs the long ones and prints a table for BENCHMARKS.md.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import LiveServer, live_server
from tests.stress import harness
from tests.stress.harness import LONG, MAX_RSS_GROWTH, SHORT, Budget

BUDGETS = [
    pytest.param(SHORT, id="short"),
    pytest.param(LONG, id="long", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[LiveServer]:
    with live_server(bundle) as server:
        yield server
    assert "Traceback" not in server.output, server.output


@pytest.mark.parametrize("budget", BUDGETS)
def test_fuzzing_finds_no_server_errors_or_schema_violations(
    server: LiveServer, budget: Budget
) -> None:
    result = harness.fuzz(server.url, budget.fuzz_cases)
    assert result.cases >= budget.fuzz_cases
    assert result.failures == []


@pytest.mark.parametrize("budget", BUDGETS)
def test_load_has_no_failures_and_bounded_memory(server: LiveServer, budget: Budget) -> None:
    result = harness.load(server, budget.load_s, budget.concurrency, budget.warm_up_s)
    assert result.requests > budget.concurrency
    failures = result.failures()
    assert failures == [], harness.summary(result)
    assert result.rss_growth <= MAX_RSS_GROWTH, (result.rss_after_warm_up, result.rss_end)


@pytest.mark.parametrize("budget", BUDGETS)
def test_sigterm_under_load_loses_no_request(bundle: Path, budget: Budget) -> None:
    with live_server(bundle) as server:
        result = harness.load(
            server,
            budget.sigterm_after_s + 30.0,  # a bound: the workers stop once the server is gone
            budget.concurrency,
            warm_up=1.0,
            sigterm_after=budget.sigterm_after_s,
        )
    assert result.signal_at is not None
    sent_before = [o for o in result.outcomes if o.sent is not None and o.sent < result.signal_at]
    assert len(sent_before) > budget.concurrency
    assert result.failures() == [], harness.summary(result)
    # uvicorn drains, then re-raises SIGTERM so the exit status reports it
    assert result.exit_code in (0, -signal.SIGTERM), server.output
    assert "Traceback" not in server.output, server.output
