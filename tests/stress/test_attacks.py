"""The attacks of issue 15 against a real server, briefly: no 5xx, no traceback, memory back.

Timing targets (/healthz p99 while each runs) are measured by `python -m tests.stress.attacks`
and recorded in BENCHMARKS.md, never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.live import live_server
from tests.stress import attacks

pytestmark = pytest.mark.slow


def test_no_attack_gets_a_server_error(bundle: Path) -> None:
    with live_server(bundle, env=attacks.ENV) as server:
        for name, (clients, attempt) in attacks.attacks(1.0).items():
            family = attacks.run_family(server.url, name, clients, attempt, 1.0)
            server_errors = {s: n for s, n in family.statuses.items() if s.startswith("5")}
            assert server_errors == {}, (name, family.statuses)
            assert family.probes and float("inf") not in family.probes, name
        before, after = attacks.reloads_under_load(server, 20)
        assert after <= before * (1 + attacks.MAX_RSS_GROWTH), (before, after)
    assert "Traceback" not in server.output, server.output
