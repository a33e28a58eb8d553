"""The attacks of issue 15 against a real `vae serve`, with /healthz probed all along.

Each family runs for a fixed time from its own threads while a prober opens a fresh connection to
/healthz every 50 ms (a Kubernetes-style probe, 3 s timeout); reported per family: the probes'
p50/p99/max latency and failures, and the attack's answers by status (a 5xx is a failure).
Then: RSS after 100 reloads under load, and after a maximal /elbo request, against the RSS before.

    python -m tests.stress.attacks [--seconds 10] [--families C,D,E,I]

Targets (issue 15): 0 x 5xx, /healthz p99 < 100 ms in every family, RSS within +10 %.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service.settings import Settings
from tests.e2e.test_server import DEFAULT_BUNDLE
from tests.live import live_server
from tests.stress import harness

# The heaviest /elbo the per-request budget allows: k=1000 draws for as many images as fit in
# VAE_MAX_ROWS (images x draws), its default.
HEAVY_K = 1000
HEAVY_IMAGES = Settings.model_fields["max_rows"].default // HEAVY_K

# admin needs the API key, so the server runs with one and every client sends it
KEY = {"X-API-Key": "attack-kit"}
ENV = {"VAE_API_KEY": KEY["X-API-Key"]}
log = logging.getLogger("tests.stress.attacks")

PROBE_EVERY_S = 0.05
PROBE_TIMEOUT_S = 3.0
HEALTHZ_P99_S = 0.100
MAX_RSS_GROWTH = 0.10


@dataclass
class Family:
    """One attack family's outcome."""

    name: str
    probes: list[float] = field(default_factory=list)  # seconds; inf for a failed probe
    statuses: Counter[str] = field(default_factory=Counter)
    lag_p99: float = float("nan")  # the server's event-loop lag, p99 (a histogram bucket bound)

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.probes, q)) if self.probes else float("nan")

    @property
    def ok(self) -> bool:
        server_errors = sum(n for s, n in self.statuses.items() if s.startswith("5"))
        return server_errors == 0 and self.quantile(0.99) < HEALTHZ_P99_S

    def row(self) -> str:
        failed = sum(1 for p in self.probes if p >= PROBE_TIMEOUT_S)
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"| {self.name} | {len(self.probes)} | {1e3 * self.quantile(0.5):.1f} | "
            f"{1e3 * self.quantile(0.99):.1f} | {1e3 * max(self.probes, default=0):.1f} | "
            f"{failed} | ≤ {1e3 * self.lag_p99:g} | {statuses} | {'yes' if self.ok else 'NO'} |"
        )


def image_file(size: int, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _probe_once(host: str, port: int) -> float:
    """One Kubernetes-style probe: a fresh connection, GET /healthz; its seconds, inf if failed."""
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            answer = b""
            while data := sock.recv(4096):
                answer += data
    except OSError:
        return float("inf")
    elapsed = time.perf_counter() - start
    return elapsed if answer.startswith(b"HTTP/1.1 200") and elapsed < PROBE_TIMEOUT_S else 1e9


def probe(url: str, seconds: float, results: Any) -> None:
    """Probe every PROBE_EVERY_S for `seconds`, in a process of its own (so that the attackers'
    threads cannot delay it), putting the list of latencies on `results` (a queue)."""
    host, port = url.removeprefix("http://").split(":")
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        latencies.append(_probe_once(host, int(port)))
        time.sleep(PROBE_EVERY_S)
    results.put(latencies)


def loop_lag(url: str) -> dict[float, float]:
    """The server's vae_event_loop_lag_seconds histogram: cumulative count by bucket bound."""
    buckets = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vae_event_loop_lag_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float(bound)] = float(line.split()[-1])
    return buckets


def lag_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The bucket bound under which a fraction `q` of the lag samples between two reads fell."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1]
    return next((bound for bound, count in counts if total and count >= q * total), float("nan"))


def _raw(url: str, payload: bytes, pause: float = 0.0, chunk: int = 1 << 16) -> str:
    """Send raw bytes on a socket; the status the server answered, or how it ended."""
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            for i in range(0, len(payload), chunk):
                sock.sendall(payload[i : i + chunk])
                if pause:
                    time.sleep(pause)
            answer = sock.recv(64)
    except OSError as exc:
        return type(exc).__name__
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"


Attack = Callable[[str, int], str]  # (url, i) -> the status, as text


def attacks(seconds: float) -> dict[str, tuple[int, Attack]]:
    """Attack name -> (concurrent clients, one attempt)."""
    bombs = {fmt: image_file(4096, fmt, **opts) for fmt, opts in _BOMB_FORMATS.items()}
    rng = np.random.default_rng(0)
    big_json = json.dumps({"pixels": rng.random((64, 200, 200)).round(3).tolist()}).encode()
    near_limit = json.dumps({"pixels": rng.random((64, 28, 28)).round(3).tolist()}).encode()
    digits = [image_file(28, "PNG") for _ in range(HEAVY_IMAGES)]  # for the maximal /elbo
    # the largest v2 decoder request: VAE_MAX_ROWS latent rows in, a 125 MB JSON answer out
    max_rows = Settings.model_fields["max_rows"].default
    latent_dim = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())["latent_dim"]
    v2_rows = {"name": "z", "shape": [max_rows, latent_dim], "datatype": "FP32"}
    v2_body = json.dumps({"inputs": [{**v2_rows, "data": [0] * (max_rows * latent_dim)}]})
    z_body = json.dumps({"z": [[0] * latent_dim] * max_rows}, separators=(",", ":"))
    npy = io.BytesIO()  # 4,000 binary images with their anomaly maps: a 72 MB answer
    np.save(npy, (rng.random((4000, 1, 28, 28)) > 0.8).astype(np.float32))
    npy_headers = {"Content-Type": "application/x-npy"}

    def post(path: str, **kwargs: Any) -> Callable[[str, int], str]:
        def attempt(url: str, i: int) -> str:
            try:
                with httpx.Client(timeout=120, headers=KEY) as client:
                    return str(client.post(f"{url}{path}", **kwargs).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        return attempt

    def get(path: str, **kwargs: Any) -> Callable[[str, int], str]:
        def attempt(url: str, i: int) -> str:
            try:
                return str(
                    httpx.get(f"{url}{path}", timeout=120, headers=KEY, **kwargs).status_code
                )
            except httpx.HTTPError as exc:
                return type(exc).__name__

        return attempt

    def files(images: list[bytes], name: str) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [
            ("images", (f"{i}.{name}", data, "application/octet-stream"))
            for i, data in enumerate(images)
        ]

    json_headers = {"Content-Type": "application/json"}
    header_100mb = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000_000 + b"\r\n\r\n"
    slow_head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 40 + b"\r\n"
    return {
        # C: small files declaring 4096x4096, 16 to a request (refused before decoding), and one
        # to a request (allowed: decoded in a worker thread)
        **{
            f"C {fmt} 16 x 4096^2": (2, post("/encode", files=files([data] * 16, fmt)))
            for fmt, data in bombs.items()
        },
        **{
            f"C {fmt} 1 x 4096^2": (2, post("/encode", files=files([data], fmt)))
            for fmt, data in bombs.items()
        },
        # D: 13 MB JSON bodies (refused by their length) and bodies just under 1 MiB (parsed)
        "D 8 x 13 MB JSON": (8, post("/encode", content=big_json, headers=json_headers)),
        "D 8 x 0.3 MB JSON": (8, post("/encode", content=near_limit, headers=json_headers)),
        # E: a 100 MB header, and heads sent a line every 0.5 s
        "E 100 MB header": (2, lambda url, i: _raw(url, header_100mb)),
        "E slow heads x 32": (32, lambda url, i: _raw(url, slow_head, pause=0.5, chunk=9)),
        # I: the heaviest requests the limits allow
        f"I /elbo {HEAVY_IMAGES} images k={HEAVY_K}": (
            2,
            post(
                "/elbo",
                files=files(digits, "png"),
                params={"k": HEAVY_K, "score": "neg_iwae"},
            ),
        ),
        "I /sample n=256": (4, get("/sample", params={"n": 256})),
        f"I /sample n={max_rows} arrays": (
            2,
            get("/sample", params={"n": max_rows, "format": "arrays"}),
        ),
        f"I /decode {max_rows} rows arrays": (
            2,
            post("/decode", params={"format": "arrays"}, content=z_body, headers=json_headers),
        ),
        "I /elbo 4000 images map=array": (
            2,
            post("/elbo", params={"map": "array"}, content=npy.getvalue(), headers=npy_headers),
        ),
        f"I v2 decoder {max_rows} rows": (
            2,
            post("/v2/models/mnist-vae-decoder/infer", content=v2_body, headers=json_headers),
        ),
    }


_BOMB_FORMATS: dict[str, dict[str, Any]] = {
    "WEBP": {"lossless": True},
    "GIF": {},
    "TIFF": {"compression": "tiff_adobe_deflate"},
    "PNG": {"optimize": True},
}


def run_family(url: str, name: str, clients: int, attempt: Attack | None, seconds: float) -> Family:
    """Run `clients` threads of `attempt` (none: the idle baseline) while a probe process runs."""
    family = Family(name)
    stop = threading.Event()
    lock = threading.Lock()

    def attacker() -> None:
        i = 0
        while not stop.is_set():
            assert attempt is not None
            status = attempt(url, i)
            with lock:
                family.statuses[status] += 1
            i += 1

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the attack under way before probing
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    prober = context.Process(target=probe, args=(url, seconds, results))
    lag_before = loop_lag(url)
    prober.start()
    family.probes = results.get(timeout=seconds + 120)
    prober.join()
    family.lag_p99 = lag_quantile(lag_before, loop_lag(url), 0.99)
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    return family


def reloads_under_load(server: harness.Server, count: int) -> tuple[int, int]:
    """RSS before and after `count` /admin/reload calls while a load of mixed requests runs."""
    stop = threading.Event()
    model = httpx.get(f"{server.url}/model", headers=KEY).json()
    requests = harness.mixed_requests(model)

    def loader() -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers=KEY) as client:
            i = 0
            while not stop.is_set():
                method, path, kwargs = requests["POST /elbo"] if i % 2 else requests["GET /sample"]
                assert client.request(method, path, **kwargs(i)).status_code == 200
                i += 1

    threads = [threading.Thread(target=loader, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=server.url, timeout=60, headers=KEY) as client:
        for _ in range(10):  # warm-up: the first reloads allocate what later ones reuse
            assert client.post("/admin/reload").status_code == 200
        before = server.rss_bytes()
        trend = []
        for i in range(count):
            response = client.post("/admin/reload")
            assert response.status_code == 200, response.text
            if i % 20 == 19:
                trend.append(f"{server.rss_bytes() / 2**20:.0f}")
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    time.sleep(12)  # the reload's late collection (service/reload.py, LATE_TRIM_S)
    after = server.rss_bytes()
    log.warning("RSS every 20 reloads, MiB: %s", " ".join(trend))
    return before, after


def maximal_elbo(server: harness.Server) -> tuple[int, int, int]:
    """RSS before, right after and 2 s after the heaviest /elbo the limits allow."""
    digits = [image_file(28, "PNG") for _ in range(HEAVY_IMAGES)]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(digits)]
    with httpx.Client(base_url=server.url, timeout=300, headers=KEY) as client:
        assert client.post("/elbo", files=files[:2]).status_code == 200
        before = server.rss_bytes()
        response = client.post("/elbo", files=files, params={"k": HEAVY_K, "score": "neg_iwae"})
        assert response.status_code == 200, response.text
        right_after = server.rss_bytes()
        time.sleep(2)
    return before, right_after, server.rss_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress.attacks", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--seconds", type=float, default=10.0, help="per attack family")
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run")
    parser.add_argument("--reloads", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    ok = True
    env = ENV
    tracebacks = 0
    with live_server(args.bundle, env=env) as server:
        print(
            "| attack | probes | /healthz p50 ms | p99 ms | max ms | failed (3 s) | "
            "loop lag p99 ms | answers | ok |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        idle = run_family(server.url, "none (idle baseline)", 0, None, args.seconds)
        print(idle.row(), flush=True)
        for name, (clients, attempt) in attacks(args.seconds).items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            family = run_family(server.url, name, clients, attempt, args.seconds)
            print(family.row(), flush=True)
            ok &= family.ok
    tracebacks += server.output.count("Traceback")
    if not args.only or "reload" in args.only:
        with live_server(args.bundle, env=env) as server:  # a fresh server for each
            before, after = reloads_under_load(server, args.reloads)
        tracebacks += server.output.count("Traceback")
        growth = after / before - 1
        print(
            f"\n{args.reloads} reloads under load: RSS {before / 2**20:.0f} -> "
            f"{after / 2**20:.0f} MiB ({100 * growth:+.1f} %)",
            flush=True,
        )
        ok &= growth <= MAX_RSS_GROWTH
    if not args.only or "elbo" in args.only:
        with live_server(args.bundle, env=env) as server:
            before, peak, after = maximal_elbo(server)
        tracebacks += server.output.count("Traceback")
        growth = after / before - 1
        print(
            f"maximal /elbo ({HEAVY_IMAGES} images, k={HEAVY_K}): RSS {before / 2**20:.0f} -> peak "
            f"{peak / 2**20:.0f} -> {after / 2**20:.0f} MiB 2 s later ({100 * growth:+.1f} %)"
        )
        ok &= growth <= MAX_RSS_GROWTH
    print(f"tracebacks in the servers' logs: {tracebacks}")
    ok &= tracebacks == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
