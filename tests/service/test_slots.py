"""VAE_COMPUTE_SLOTS: how many requests compute in worker threads at once."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.bundle import load_bundle
from service.inference import BatchPolicy, Model, available_cpus, compute_slots
from service.metrics import Metrics
from service.settings import Settings

JOBS = 6


def peak_concurrency(model: Model, rows: int) -> int:
    """Offload JOBS jobs of `rows` rows at once; the most that ran at the same time."""
    lock, active, peak = threading.Lock(), [0], [0]

    def work(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return i

    async def main() -> list[int]:
        return await asyncio.gather(*(model.offload(work, i, rows=rows) for i in range(JOBS)))

    assert asyncio.run(main()) == list(range(JOBS))  # every job ran, each answered its own caller
    assert model._offloaded == 0  # and none is left counted
    return peak[0]


@pytest.fixture(scope="module")
def policy() -> BatchPolicy:
    return BatchPolicy(max_batch_size=8, max_delay_s=0.0, max_queue=64, workers=1)


def test_slots_bound_the_work_in_threads(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert peak_concurrency(Model(bundle, Metrics(), compute_slots=2), rows=1) == 2
    assert peak_concurrency(Model(bundle, Metrics(), compute_slots=1), rows=1) == 1
    assert peak_concurrency(Model(bundle, Metrics(), compute_slots=0), rows=1) > 2  # no limit


def test_with_batching_only_full_batches_take_a_slot(
    tiny_bundle: Path, policy: BatchPolicy
) -> None:
    """Small requests wait on the batcher in their threads: bounding them would only shrink the
    micro-batches they share, so only work of a full micro-batch or more is bounded."""
    model = Model(load_bundle(tiny_bundle), Metrics(), policy, compute_slots=2)
    try:
        assert peak_concurrency(model, rows=policy.max_batch_size - 1) > 2
        assert peak_concurrency(model, rows=policy.max_batch_size) == 2
    finally:
        model.close()


def test_zero_means_one_slot_per_call_that_fits_the_cores() -> None:
    cpus = available_cpus()
    assert compute_slots(Settings(compute_slots=3)) == 3
    assert compute_slots(Settings(threads=1)) == cpus
    assert compute_slots(Settings(threads=0)) == 1  # each call uses every core
    assert compute_slots(Settings(threads=2 * cpus)) == 1


@pytest.mark.parametrize("value", [-1, 5000, "many"])
def test_bad_compute_slots_stop_start_up(value: object) -> None:
    with pytest.raises(ValidationError, match="compute_slots"):
        Settings(compute_slots=value)  # type: ignore[arg-type]
