"""Every anomaly-score function of service/objective.py (numpy) equals its torch twin in
model/objective.py, same name and argument order, on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from service import objective

torch = pytest.importorskip("torch")
model_objective = pytest.importorskip("model.objective")

RTOL = 1e-5


def _inputs(channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((4, channels, 12, 10), dtype=np.float32)
    x[0] = 0.0  # a blank image: no contrast
    x[1] = 1.0 - x[1]  # and an inverted one
    mean = rng.random(x.shape, dtype=np.float32)
    return x, mean


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "name",
    [
        "blur",
        "contrast",
        "anomaly_map",
        *(f.__name__ for f in objective.RECONSTRUCTION_SCORES.values()),
    ],
)
def test_numpy_and_torch_agree(name: str, channels: int) -> None:
    x, mean = _inputs(channels, seed=channels)
    args = (x,) if name in ("contrast", "blur") else (x, mean)
    expected = getattr(model_objective, name)(*map(torch.from_numpy, args)).numpy()
    np.testing.assert_allclose(getattr(objective, name)(*args), expected, rtol=RTOL, atol=1e-7)
