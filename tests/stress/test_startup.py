"""Broken bundles at start-up: `vae serve` exits non-zero with one line naming the file.

All cases start at once (each is a process that imports onnxruntime), so the module costs about
one start-up. Reload with a broken bundle is covered with the reload endpoint's tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import live

Breaker = Callable[[Path], None]


def _manifest(bundle: Path, **changes: object) -> None:
    path = bundle / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rehash(bundle: Path, name: str) -> None:
    """Make the manifest agree with the file as it now is (size and SHA-256)."""
    data = (bundle / name).read_bytes()
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _manifest(bundle, files=files)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _not_onnx(bundle: Path) -> None:
    (bundle / "decoder.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf model" * 8)
    _rehash(bundle, "decoder.onnx")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


# case: (how to break the bundle, exit code, the line expected, with {bundle} for its path)
CASES: dict[str, tuple[Breaker, int, str]] = {
    "bundle directory missing": (
        shutil.rmtree,
        2,
        "vae serve: bundle directory {bundle} does not exist (set by --bundle)",
    ),
    "manifest missing": (
        lambda b: (b / "manifest.json").unlink(),
        2,
        "vae serve: {bundle}/manifest.json is missing",
    ),
    "manifest not JSON": (
        lambda b: (b / "manifest.json").write_text('{"schema_version": 1,'),
        2,
        "vae serve: {bundle}/manifest.json is not readable JSON: Expecting property name",
    ),
    "manifest checksum malformed": (
        lambda b: _manifest(b, files={"encoder.onnx": {"sha256": "xyz", "bytes": 1}}),
        2,
        "vae serve: {bundle}/manifest.json is invalid: files.encoder.onnx.sha256: String should "
        "match pattern",
    ),
    "encoder missing": (
        lambda b: (b / "encoder.onnx").unlink(),
        3,
        "cannot start: {bundle}/encoder.onnx is missing",
    ),
    "decoder truncated": (
        lambda b: _truncate(b / "decoder.onnx"),
        3,
        "cannot start: {bundle}/decoder.onnx has 1000 bytes, the manifest says",
    ),
    "encoder checksum mismatch": (
        lambda b: _flip_byte(b / "encoder.onnx"),
        3,
        "cannot start: {bundle}/encoder.onnx fails its SHA-256 check against manifest.json "
        "(corrupt?)",
    ),
    "decoder not ONNX (checksum matches)": (
        _not_onnx,
        3,
        "cannot start: {bundle}/decoder.onnx cannot be loaded by onnxruntime",
    ),
    "graphs do not match the manifest": (
        lambda b: _manifest(b, latent_dim=9),
        3,
        "cannot start: {bundle}/encoder.onnx: output 'mu' has shape",
    ),
}


def start_broken(source: Path, root: Path) -> dict[str, tuple[Path, int, str]]:
    """Break a copy of `source` per case, start them all at once: bundle, exit code, output."""
    processes = {}
    for i, (case, (breaker, _, _)) in enumerate(CASES.items()):
        bundle = root / f"case{i}"
        shutil.copytree(source, bundle)
        breaker(bundle)
        processes[case] = (bundle, live.start(live.vae_serve(bundle), live.server_env()))
    results = {}
    for case, (bundle, server) in processes.items():
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=90)  # a broken bundle stops start-up by itself
        code = server.stop()
        results[case] = (bundle, code, server.output)
    return results


@pytest.fixture(scope="module")
def started(
    tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, int, str]]:
    """Every case's bundle, exit code and output."""
    return start_broken(tiny_bundle, tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("case", CASES)
def test_a_broken_bundle_stops_start_up(
    started: dict[str, tuple[Path, int, str]], case: str
) -> None:
    bundle, code, output = started[case]
    _, expected_code, expected = CASES[case]
    assert code == expected_code, output
    assert expected.format(bundle=bundle) in output, output
