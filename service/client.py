"""A small typed Python client for the VAE server: NumPy arrays in, NumPy arrays out.

    from service.client import VAEClient

    with VAEClient("http://localhost:8000") as vae:
        scores = vae.elbo(images)  # (B, H, W) or (B, C, H, W), uint8 or floats in [0, 1]
        scores.anomaly_score, scores.is_anomaly  # (B,) arrays
        mu = vae.encode(images).mu  # (B, latent_dim)
        x = vae.decode(mu)  # (B, C, H, W) float32 in [0, 1]

Images travel as one `application/x-npy` body (no image codec on either side); results come back
as raw arrays (`format=arrays`). It needs only the serving install (httpx, numpy), never torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from numpy.typing import ArrayLike, NDArray

NPY_MEDIA = "application/x-npy"


class VAEError(RuntimeError):
    """The server refused a request; `status` is the HTTP status, `detail` its explanation."""

    def __init__(self, status: int, detail: Any) -> None:
        if isinstance(detail, list):  # FastAPI's validation errors: [{loc, msg}, ...]
            text = "; ".join(
                f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}"
                if isinstance(e, dict)
                else str(e)
                for e in detail
            )
        else:
            text = str(detail)
        super().__init__(f"{status}: {text}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Encoding:
    """The approximate posterior q(z|x) = N(mu, diag exp(logvar)) of each image."""

    mu: NDArray[np.float32]  # (B, latent_dim)
    logvar: NDArray[np.float32]  # (B, latent_dim)
    z: NDArray[np.float32] | None  # (B, latent_dim) draws when sample=True
    seed: int | None


@dataclass(frozen=True)
class Samples:
    """Images decoded from z drawn from the bundle's prior, its spread scaled by temperature."""

    images: NDArray[np.float32]  # (n, C, H, W) in [0, 1]
    z: NDArray[np.float32]  # (n, latent_dim)
    seed: int


@dataclass(frozen=True)
class Scores:
    """ELBO terms and anomaly verdicts of each image (nats); `raw` is the server's whole answer."""

    elbo: NDArray[np.float64]  # (B,)
    reconstruction: NDArray[np.float64]  # (B,)
    kl: NDArray[np.float64]  # (B,)
    iwae: NDArray[np.float64] | None  # (B,) when k was given
    anomaly_score: NDArray[np.float64]  # (B,) higher is more anomalous
    percentile: NDArray[np.float64]  # (B,) NaN without calibration
    is_anomaly: NDArray[np.bool_] | None  # (B,) None without a threshold
    score: str
    threshold: float | None
    raw: dict[str, Any]


# the last axis of a channels-last image: grey, grey and alpha, RGB, RGBA
CHANNELS_LAST = (1, 2, 3, 4)


def to_npy(images: ArrayLike) -> bytes:
    """Images (uint8, bool or floats in [0, 1]) as the server's .npy layout, `(B, C, H, W)`.

    Takes `(H, W)`, `(B, H, W)`, `(B, C, H, W)` and, as Pillow and most image libraries give
    them, channels-last `(H, W, K)` and `(B, H, W, K)` with K = 1 (grey), 2 (grey and alpha),
    3 (RGB) or 4 (RGBA); alpha is dropped. A 3-D array whose last axis is 1 to 4 is one
    channels-last image, not a batch of 1- to 4-pixel-wide grey ones.
    """
    array = np.asarray(images)
    if array.ndim == 3 and array.shape[-1] in CHANNELS_LAST:
        array = array[None]  # one channels-last image
    if array.ndim == 4 and array.shape[1] not in (1, 3) and array.shape[-1] in CHANNELS_LAST:
        colour = 3 if array.shape[-1] >= 3 else 1  # the channels kept: alpha dropped
        array = np.moveaxis(array[..., :colour], -1, 1)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class VAEClient:
    """Calls a running server; a context manager that closes its connection pool."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> VAEClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise VAEError(response.status_code, detail)
        body: dict[str, Any] = response.json()
        return body

    def _images(self, path: str, images: ArrayLike, params: dict[str, Any]) -> dict[str, Any]:
        query = {k: v for k, v in params.items() if v is not None}
        headers = {"Content-Type": NPY_MEDIA}
        return self._call("POST", path, content=to_npy(images), headers=headers, params=query)

    def model(self) -> dict[str, Any]:
        """The bundle's manifest: image shape, latent_dim, likelihood, calibration, ..."""
        return self._call("GET", "/model")

    def encode(
        self, images: ArrayLike, *, sample: bool = False, seed: int | None = None
    ) -> Encoding:
        """Posterior mean and log-variance of each image; with `sample`, a draw z."""
        body = self._images("/encode", images, {"sample": str(sample).lower(), "seed": seed})
        rows = body["results"]
        z = np.array([r["z"] for r in rows], np.float32) if sample else None
        return Encoding(
            mu=np.array([r["mu"] for r in rows], np.float32),
            logvar=np.array([r["logvar"] for r in rows], np.float32),
            z=z,
            seed=body.get("seed"),
        )

    def decode(self, z: ArrayLike) -> NDArray[np.float32]:
        """The decoder's mean (Gaussian) or probabilities (Bernoulli) at each z: `(B, C, H, W)`."""
        rows = np.asarray(z, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None]
        body = self._call("POST", "/decode", params={"format": "arrays"}, json={"z": rows.tolist()})
        return np.asarray(body["arrays"], np.float32)

    def sample(self, n: int = 16, *, seed: int | None = None, temperature: float = 1.0) -> Samples:
        """`n` images from the prior, decoded."""
        params = {"n": n, "temperature": temperature, "format": "arrays"}
        if seed is not None:
            params["seed"] = seed
        body = self._call("GET", "/sample", params=params)
        return Samples(
            images=np.asarray(body["arrays"], np.float32),
            z=np.asarray(body["z"], np.float32),
            seed=int(body["seed"]),
        )

    def reconstruct(self, images: ArrayLike) -> NDArray[np.float32]:
        """What the model makes of each image (the decoder's mean at z = mu): `(B, C, H, W)`."""
        body = self._images("/reconstruct", images, {"format": "arrays"})
        return np.asarray(body["arrays"], np.float32)

    def elbo(
        self,
        images: ArrayLike,
        *,
        k: int | None = None,
        samples: int | None = None,
        score: str | None = None,
        threshold: float | None = None,
        seed: int | None = None,
    ) -> Scores:
        """ELBO (and the IWAE bound with `k`), anomaly score, percentile and verdict per image."""
        params = {"k": k, "samples": samples, "score": score, "threshold": threshold, "seed": seed}
        body = self._images("/elbo", images, params)
        rows = body["results"]

        def column(name: str) -> NDArray[np.float64]:
            return np.array([np.nan if r[name] is None else r[name] for r in rows], np.float64)

        verdicts = [r["is_anomaly"] for r in rows]
        return Scores(
            elbo=column("elbo"),
            reconstruction=column("reconstruction"),
            kl=column("kl"),
            iwae=column("iwae") if k is not None else None,
            anomaly_score=column("anomaly_score"),
            percentile=column("percentile"),
            is_anomaly=None if None in verdicts else np.array(verdicts, np.bool_),
            score=str(body["score"]),
            threshold=body["threshold"],
            raw=body,
        )
