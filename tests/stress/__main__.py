"""`python -m tests.stress`: the long stress runs against a real server, as a results table.

Fuzzing (schemathesis), sustained load with memory, SIGTERM under load and broken bundles at
start-up; the same drivers and budgets as `pytest -m slow tests/stress`. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path

from tests.e2e.test_server import DEFAULT_BUNDLE
from tests.live import live_server
from tests.stress import harness
from tests.stress.harness import LONG, MAX_RSS_GROWTH, SHORT

log = logging.getLogger("tests.stress")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.stress",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle to serve")
    parser.add_argument("--short", action="store_true", help="the default suite's short budget")
    parser.add_argument("--seed", type=int, default=0, help="schemathesis (hypothesis) seed")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    budget = SHORT if args.short else LONG
    rows: list[tuple[str, str, str, str, str]] = []
    ok = True

    log.warning("fuzzing: %d schemathesis cases", budget.fuzz_cases)
    with live_server(args.bundle) as server:
        fuzz = harness.fuzz(server.url, budget.fuzz_cases, seed=args.seed)
        rows.append(
            (
                "schemathesis (5xx, response schema)",
                f"{fuzz.cases} cases, {len(fuzz.per_operation)} operation x mode",
                str(len(fuzz.failures)),
                "",
                f"{fuzz.seconds:.0f} s",
            )
        )
        ok &= not fuzz.failures
        log.warning(
            "load: %g s at concurrency %d after %g s warm-up",
            budget.load_s,
            budget.concurrency,
            budget.warm_up_s,
        )
        load = harness.load(server, budget.load_s, budget.concurrency, budget.warm_up_s)
        rows.append(
            (
                f"load, {budget.concurrency} concurrent, {load.seconds:.0f} s",
                f"{load.requests} requests, {load.per_second:.0f}/s",
                str(len(load.failures())),
                f"{load.rss_after_warm_up / 2**20:.0f} -> {load.rss_end / 2**20:.0f} MiB "
                f"({100 * load.rss_growth:+.1f} %)",
                "",
            )
        )
        ok &= not load.failures() and load.rss_growth <= MAX_RSS_GROWTH
    for failure in fuzz.failures:
        print(f"FUZZ FAILURE {failure}")
    print(harness.summary(load))
    if "Traceback" in server.output:
        print(f"the server logged errors:\n{server.output[-20000:]}")
        ok = False

    log.warning("SIGTERM %g s into load", budget.sigterm_after_s)
    with live_server(args.bundle) as server:
        term = harness.load(
            server, budget.sigterm_after_s + 30, budget.concurrency, 1.0, budget.sigterm_after_s
        )
    assert term.signal_at is not None
    print(harness.summary(term))
    if "Traceback" in server.output:
        print(f"the server logged errors:\n{server.output[-20000:]}")
        ok = False
    before = sum(o.sent is not None and o.sent < term.signal_at for o in term.outcomes)
    clean = term.exit_code in (0, -signal.SIGTERM)
    rows.append(
        (
            "SIGTERM under load",
            f"{before} sent before the signal, {term.requests} in all",
            str(len(term.failures())),
            "",
            f"exit {term.exit_code}",
        )
    )
    ok &= clean and not term.failures()

    log.warning("broken bundles at start-up")
    from tests.stress.test_startup import CASES, start_broken

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results = start_broken(args.bundle, Path(tmp))
        wrong = [
            case
            for case, (bundle, code, output) in results.items()
            if code != CASES[case][1] or CASES[case][2].format(bundle=bundle) not in output
        ]
        seconds = time.perf_counter() - started
        shutil.rmtree(tmp, ignore_errors=True)
    rows.append(
        (
            "broken bundle at start-up",
            f"{len(results)} cases",
            str(len(wrong)),
            "",
            f"{seconds:.0f} s",
        )
    )
    ok &= not wrong

    header = ("run", "volume", "failures", "RSS after warm-up -> end", "notes")
    print()
    for row in (header, ("---",) * len(header), *rows):
        print("| " + " | ".join(row) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
