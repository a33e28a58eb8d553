"""Small builders shared by the service tests: encoded images and hand-made ONNX bundles."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def stroke(column: int = 12, size: int = 28) -> np.ndarray:
    """A bright vertical stroke on black, like the tiny bundle's calibration images, in [0, 1]."""
    x = np.zeros((size, size), dtype=np.float32)
    x[4:24, column : column + 3] = 1.0
    return x


def noise(seed: int = 0, size: int = 28) -> np.ndarray:
    """Uniform noise in [0, 1]."""
    return np.random.default_rng(seed).random((size, size), dtype=np.float32)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """An `(H, W)` or `(H, W, 3)` array in [0, 1] as an encoded image file."""
    image = Image.fromarray(np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8))
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width x height` pixels but carries a tiny payload: a pixel bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def files(*images: bytes, name: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `files=` for TestClient/httpx, one part per image."""
    return [(name, (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def rewrite_manifest(bundle: Path, out: Path, **changes: Any) -> Path:
    """Copy a bundle to `out`, applying top-level manifest changes (None deletes a key)."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def linear_bundle(
    out: Path,
    *,
    latent_dim: int = 4,
    image: tuple[int, int, int] = (1, 28, 28),
    input_name: str = "x",
    batch: int | str = "batch",
    manifest_changes: dict[str, Any] | None = None,
) -> Path:
    """A hand-made bundle of real ONNX graphs (linear encoder/decoder) for start-up checks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, h, w = image
    pixels = c * h * w
    rng = np.random.default_rng(0)

    def graph_file(
        name: str, nodes: list[Any], inputs: list[Any], outputs: list[Any], init: list[Any]
    ) -> bytes:
        graph = helper.make_graph(nodes, name, inputs, outputs, initializer=init)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model.SerializeToString()

    def tensor(name: str, dims: list[int | str]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    weights = [
        numpy_helper.from_array(
            0.01 * rng.standard_normal((pixels, latent_dim)).astype(np.float32), "w_mu"
        ),
        numpy_helper.from_array(
            0.01 * rng.standard_normal((pixels, latent_dim)).astype(np.float32), "w_lv"
        ),
        numpy_helper.from_array(np.array([0, pixels], dtype=np.int64), "flat"),
    ]
    encoder = graph_file(
        "encoder",
        [
            helper.make_node("Reshape", [input_name, "flat"], ["flat_x"]),
            helper.make_node("MatMul", ["flat_x", "w_mu"], ["mu"]),
            helper.make_node("MatMul", ["flat_x", "w_lv"], ["logvar"]),
        ],
        [tensor(input_name, [batch, c, h, w])],
        [tensor("mu", [batch, latent_dim]), tensor("logvar", [batch, latent_dim])],
        weights,
    )
    decoder = graph_file(
        "decoder",
        [
            helper.make_node("MatMul", ["z", "w_out"], ["flat_out"]),
            helper.make_node("Reshape", ["flat_out", "shape"], ["logits"]),
        ],
        [tensor("z", [batch, latent_dim])],
        [tensor("logits", [batch, c, h, w])],
        [
            numpy_helper.from_array(
                0.1 * rng.standard_normal((latent_dim, pixels)).astype(np.float32), "w_out"
            ),
            numpy_helper.from_array(np.array([0, c, h, w], dtype=np.int64), "shape"),
        ],
    )
    out.mkdir(parents=True)
    entries = {}
    for name, data in (("encoder.onnx", encoder), ("decoder.onnx", decoder)):
        (out / name).write_bytes(data)
        entries[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": "linear",
        "version": "0",
        "image": {"channels": c, "height": h, "width": w},
        "latent_dim": latent_dim,
        "likelihood": "bernoulli",
        "sigma": None,
        "decoder_output": "logits",
        "files": entries,
        **(manifest_changes or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
