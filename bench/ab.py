"""Interleaved A/B of two checkouts' servers: the same cells, alternating, medians of the rounds.

python -m bench.ab --old ../main                    # this checkout is "new"
python -m bench.ab --old ../main --cases encode,elbo --concurrency 1,32 --rounds 3 --seconds 4

Each checkout serves `bench.apps:noop_app` from its own tree (uvicorn on loopback, its own
process, default settings plus any `--old-env` / `--new-env`); bench/serving.py's load process
drives one cell at a time, old then new (then new then old in the next round), so both see the
same drift of a shared machine. Prints a Markdown table: req/s per round, the median change, p99
medians, and the server's CPU time per request (from /proc; steadier than req/s on a busy machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, machine, now
from bench.serving import CASES, load, serve, write_inputs
from service.settings import DEFAULT_BUNDLE


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children that have exited, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


UVICORN = "{python} -m uvicorn bench.apps:noop_app --factory --host 127.0.0.1 --port {port} "
UVICORN += "--log-level warning --no-access-log"


def parse_env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other checkout (A)")
    p.add_argument("--new", type=Path, default=REPO, help="this checkout (B)")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="bundle directory")
    p.add_argument("--cases", default="encode,elbo,decode,sample", help="bench/serving.py cases")
    p.add_argument("--concurrency", default="32", help="comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--old-env", nargs="*", default=[], help="VAE_X=value for A")
    p.add_argument("--new-env", nargs="*", default=[], help="VAE_X=value for B")
    p.add_argument("--old-command", default=UVICORN, help="A's server command line")
    p.add_argument("--new-command", default=UVICORN, help="B's server command line")
    args = p.parse_args()
    cases = args.cases.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        data = Path(tmp)
        write_inputs(data, args.bundle)
        old = args.old.resolve()
        urls = {
            "old": stack.enter_context(
                serve(old, args.bundle, parse_env(args.old_env), args.old_command.split())
            ),
            "new": stack.enter_context(
                serve(args.new, args.bundle, parse_env(args.new_env), args.new_command.split())
            ),
        }
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            for case in cases:
                for c in levels:
                    for side in order:
                        url, pid = urls[side]
                        before = cpu_seconds(pid)
                        result = load(url, case, c, args.seconds, data)
                        # the whole cell's server CPU (warm-up included) per measured request
                        cpu = cpu_seconds(pid) - before
                        result["cpu_us"] = 1e6 * cpu / max(1, result["requests"])
                        results.setdefault((side, case, c), []).append(result)
    print(f"# Interleaved A/B, {now()}\n")
    print(f"- A: {args.old} {' '.join(args.old_env)}; B: {args.new} {' '.join(args.new_env)}")
    print(f"- A's server: `{args.old_command}`; B's: `{args.new_command}`")
    print(f"- machine: {machine()}; {args.rounds} rounds, {args.seconds:g} s a cell\n")
    print("Server CPU per request covers the whole cell (warm-up included) of the server process")
    print("(one worker): unlike req/s, it hardly depends on what else runs on the machine.\n")
    print("| request | c | A req/s | B req/s | median change | p99 ms A → B | CPU µs/req A → B |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        for c in levels:
            a, b = results["old", case, c], results["new", case, c]

            def rates(cells: list[dict[str, Any]]) -> str:
                return " / ".join(f"{cell['rps']:,.0f}" for cell in cells)

            ra = statistics.median(cell["rps"] for cell in a)
            rb = statistics.median(cell["rps"] for cell in b)
            pa = statistics.median(cell["p99_ms"] for cell in a)
            pb = statistics.median(cell["p99_ms"] for cell in b)
            errors = sum(cell["errors"] for cell in a + b)
            note = f" ({errors} errors)" if errors else ""
            ca = statistics.median(cell["cpu_us"] for cell in a)
            cb = statistics.median(cell["cpu_us"] for cell in b)
            print(
                f"| {CASES[case].name} | {c} | {rates(a)} | {rates(b)} | {rb / ra - 1:+.0%}{note} |"
                f" {pa:.1f} → {pb:.1f} | {ca:,.0f} → {cb:,.0f} |"
            )


if __name__ == "__main__":
    main()
