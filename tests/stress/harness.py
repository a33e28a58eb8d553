"""Stress and fault drivers against a real `vae serve` on loopback, bounded in count and time.

- `fuzz`: schemathesis cases from the served /openapi.json (positive and negative data), checked
  for 5xx and for responses that violate the documented schema.
- `load`: a fixed concurrency of valid requests over mixed endpoints for a fixed time, with the
  server's resident memory (VmRSS) after a warm-up and at the end.
- `load(..., sigterm_after=...)`: the same, with SIGTERM sent mid-load; every request whose body
  was fully sent before the signal must still complete with 200.

Used by tests/stress/test_stress.py (short runs in the default suite, long ones under -m slow) and
by `python -m tests.stress`, which prints a results table.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.live import LiveServer

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 120.0


@dataclass(frozen=True)
class Budget:
    """How long each driver runs: SHORT in the default suite, LONG under -m slow and __main__."""

    fuzz_cases: int
    load_s: float
    warm_up_s: float
    concurrency: int
    sigterm_after_s: float


SHORT = Budget(fuzz_cases=150, load_s=5.0, warm_up_s=2.0, concurrency=64, sigterm_after_s=1.5)
LONG = Budget(fuzz_cases=1000, load_s=60.0, warm_up_s=10.0, concurrency=64, sigterm_after_s=10.0)
MAX_RSS_GROWTH = 0.10


# --- schemathesis ---------------------------------------------------------------------------


@dataclass
class FuzzResult:
    """Cases run per operation and the failures found (5xx or schema violations)."""

    cases: int = 0
    per_operation: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _fuzz_operation(
    strategy: Any, label: str, share: int, url: str, seed: int, result: FuzzResult
) -> None:
    import hypothesis
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    checks = [not_a_server_error, response_schema_conformance]

    @hypothesis.settings(
        max_examples=share,
        deadline=None,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.seed(seed)
    @hypothesis.given(case=strategy)
    def run(case: Any) -> None:
        result.cases += 1
        result.per_operation[label] += 1
        try:
            case.call_and_validate(base_url=url, checks=checks, timeout=REQUEST_TIMEOUT)
        except Exception as exc:  # one line per distinct failure; the run goes on
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            text = f"{label}: {type(exc).__name__}: {first}"
            if text not in result.failures:
                result.failures.append(text)
                log.warning("%s\n%s", text, case.as_curl_command())

    # Unsatisfiable: nothing to make invalid (no parameters, no body)
    with contextlib.suppress(hypothesis.errors.Unsatisfiable):
        run()


def fuzz(url: str, cases: int, seed: int = 0) -> FuzzResult:
    """Run about `cases` schemathesis cases, spread over every operation in /openapi.json.

    Half the budget generates schema-valid data, half invalid data; each response is checked with
    `not_a_server_error` and `response_schema_conformance`. Operations that cannot use their share
    (no parameters: one case exhausts them) hand it on to the rest.
    """
    import schemathesis
    from schemathesis.generation import GenerationMode

    started = time.perf_counter()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    plans = [(op, mode) for op in operations for mode in GenerationMode]
    result = FuzzResult()
    for index, (operation, mode) in enumerate(plans):
        share = math.ceil((cases - result.cases) / (len(plans) - index))
        if share > 0:
            strategy = operation.as_strategy(generation_mode=mode)
            label = f"{operation.label} [{mode.value}]"
            _fuzz_operation(strategy, label, share, url, seed, result)
    result.seconds = time.perf_counter() - started
    return result


# --- load -----------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# (method, path, the request's keyword arguments for httpx given a running counter)
Request = tuple[str, str, Callable[[int], dict[str, Any]]]


def mixed_requests(model: dict[str, Any]) -> dict[str, Request]:
    """Valid requests over every model endpoint and the operational ones, by name."""
    c, h, w = (model["image"][key] for key in ("channels", "height", "width"))
    d = model["latent_dim"]
    name = model["name"]
    rng = np.random.default_rng(0)
    images = rng.random((4, h, w)).astype(np.float32) * (rng.random((4, h, w)) > 0.8)
    pngs = [_png(image) for image in images]
    b64 = base64.b64encode(pngs[0]).decode()
    x = np.broadcast_to(images[:2, None], (2, c, h, w))
    z = rng.standard_normal((2, d)).tolist()
    files = [("images", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:2])]

    def v2(tensor: str, array: Any) -> dict[str, Any]:
        data = np.asarray(array, dtype=np.float32)
        spec = {"name": tensor, "shape": list(data.shape), "datatype": "FP32"}
        return {"json": {"inputs": [{**spec, "data": data.ravel().tolist()}], "id": tensor}}

    encoder, decoder = v2("x", x), v2("z", z)
    return {
        "GET /healthz": ("GET", "/healthz", lambda i: {}),
        "GET /readyz": ("GET", "/readyz", lambda i: {}),
        "GET /model": ("GET", "/model", lambda i: {}),
        "GET /metrics": ("GET", "/metrics", lambda i: {}),
        "POST /encode multipart": ("POST", "/encode", lambda i: {"files": files}),
        "POST /encode base64": (
            "POST",
            "/encode",
            lambda i: {"json": {"images": [b64]}, "params": {"sample": True, "seed": i}},
        ),
        "POST /decode": ("POST", "/decode", lambda i: {"json": {"z": z}}),
        "GET /sample": ("GET", "/sample", lambda i: {"params": {"n": 4, "seed": i}}),
        "POST /elbo": ("POST", "/elbo", lambda i: {"files": files, "params": {"k": 8}}),
        "POST /reconstruct": (
            "POST",
            "/reconstruct",
            lambda i: {"content": pngs[i % 4], "headers": {"Content-Type": "image/png"}},
        ),
        "POST /v2 encoder infer": ("POST", f"/v2/models/{name}-encoder/infer", lambda i: encoder),
        "POST /v2 decoder infer": ("POST", f"/v2/models/{name}-decoder/infer", lambda i: decoder),
        "GET /v2/health/ready": ("GET", "/v2/health/ready", lambda i: {}),
    }


READINESS = {"GET /readyz", "GET /v2/health/ready"}  # names in mixed_requests


@dataclass
class Outcome:
    """One request: which, when its body was fully sent (monotonic), and how it ended."""

    endpoint: str
    sent: float | None
    status: int | None
    error: str | None = None


@dataclass
class LoadResult:
    """Counts, failures and memory of one load run."""

    seconds: float
    concurrency: int
    outcomes: list[Outcome]
    rss_after_warm_up: int = 0
    rss_end: int = 0
    signal_at: float | None = None
    exit_code: int | None = None

    @property
    def requests(self) -> int:
        return len(self.outcomes)

    def failures(self) -> list[Outcome]:
        """Requests that did not answer 200 (all are valid); after SIGTERM, only those sent before.

        A request counts as sent once its body is fully written (httpcore's trace event). Ones
        sent after the signal may fairly be refused, so they are not failures; nor is a readiness
        probe answered "not ready" once the signal is in (draining is what it should report).
        """
        return [o for o in self.outcomes if o.status != 200 and not self._excused(o)]

    def _excused(self, o: Outcome) -> bool:
        if self.signal_at is None:
            return False
        if o.sent is None or o.sent >= self.signal_at:
            return True
        return o.endpoint in READINESS and o.status in (400, 503)

    @property
    def rss_growth(self) -> float:
        """Relative growth of resident memory from after the warm-up to the end."""
        return self.rss_end / self.rss_after_warm_up - 1.0

    @property
    def per_second(self) -> float:
        return sum(o.status == 200 for o in self.outcomes) / self.seconds


async def _load(
    server: LiveServer,
    seconds: float,
    concurrency: int,
    warm_up: float,
    sigterm_after: float | None,
) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
        model = (await client.get("/model")).json()
        requests = list(mixed_requests(model).items())
        counter = itertools.count()
        outcomes: list[Outcome] = []
        result = LoadResult(seconds=seconds, concurrency=concurrency, outcomes=outcomes)
        started = time.monotonic()
        stop_at = started + warm_up + seconds

        async def one(endpoint: str, request: Request, i: int) -> None:
            outcome = Outcome(endpoint, sent=None, status=None)

            async def trace(event: str, info: dict[str, Any]) -> None:
                if event == "http11.send_request_body.complete":
                    outcome.sent = time.monotonic()

            outcomes.append(outcome)
            method, path, kwargs = request
            try:
                response = await client.request(
                    method, path, extensions={"trace": trace}, **kwargs(i)
                )
                outcome.status = response.status_code
                if response.status_code != 200:
                    outcome.error = response.text[:300]
            except httpx.HTTPError as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"

        async def worker(offset: int) -> None:
            while time.monotonic() < stop_at:
                i = next(counter)
                endpoint, request = requests[(i + offset) % len(requests)]
                await one(endpoint, request, i)
                if result.signal_at is not None and server.process.poll() is not None:
                    return

        async def conductor() -> None:
            await asyncio.sleep(warm_up)
            result.rss_after_warm_up = server.rss_bytes()
            if sigterm_after is not None:
                await asyncio.sleep(sigterm_after)
                result.signal_at = time.monotonic()
                os.kill(server.process.pid, signal.SIGTERM)
                return
            await asyncio.sleep(max(0.0, stop_at - time.monotonic() - 0.05))
            result.rss_end = server.rss_bytes()

        await asyncio.gather(conductor(), *(worker(k) for k in range(concurrency)))
        result.seconds = time.monotonic() - started - warm_up
        return result


def load(
    server: LiveServer,
    seconds: float,
    concurrency: int = 64,
    warm_up: float = 2.0,
    sigterm_after: float | None = None,
) -> LoadResult:
    """Keep `concurrency` valid requests in flight for `warm_up + seconds` over mixed endpoints.

    With `sigterm_after`, SIGTERM the server that long after the warm-up and keep sending until
    it has exited; the result then holds its exit code.
    """
    result = asyncio.run(_load(server, seconds, concurrency, warm_up, sigterm_after))
    if sigterm_after is not None:
        result.exit_code = server.process.wait(timeout=60)
    return result


def summary(result: LoadResult) -> str:
    """One line per endpoint (requests, failures), then each distinct failure once."""
    totals = Counter(o.endpoint for o in result.outcomes)
    failures = result.failures()
    bad = Counter(o.endpoint for o in failures)
    lines = [f"  {name:28s} {totals[name]:6d} requests, {bad[name]} failed" for name in totals]
    distinct = Counter(f"{o.endpoint}: {o.status} {o.error}" for o in failures)
    lines += [f"  FAILED {count}x {text}" for text, count in distinct.items()]
    return "\n".join(lines)
