"""The lock files in requirements/ against pyproject.toml: complete, hashed, consistent.

They are written by requirements/lock.sh; a dependency added to pyproject.toml without running it
fails here, naming the lock and the requirement, rather than in an image build.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKS = {  # lock file: the pyproject.toml extras it holds besides the base dependencies
    "serving.txt": (),
    "train.txt": ("train",),
    "dev.txt": ("train", "dev"),
    "batch.txt": ("batch",),
}
# Linux, Python 3.11: the environment lock.sh resolves for.
ENVIRONMENT = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}


def read_lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """Each pinned package of a lock file: its version and the hashes given for it."""
    text = (ROOT / "requirements" / name).read_text().replace("\\\n", " ")
    pins: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        pkg, sep, version = requirement.partition("==")
        assert sep, f"{name}: {requirement!r} is not pinned with =="
        hashes = [o.removeprefix("--hash=") for o in options if o.startswith("--hash=sha256:")]
        pins[canonicalize_name(pkg)] = (Version(version), hashes)
    return pins


def required(extras: tuple[str, ...]) -> list[Requirement]:
    lines = list(PROJECT["dependencies"])
    for extra in extras:
        lines += PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("name, extras", LOCKS.items())
def test_lock_satisfies_pyproject(name: str, extras: tuple[str, ...]) -> None:
    pins = read_lock(name)
    for requirement in required(extras):
        if requirement.marker and not requirement.marker.evaluate(ENVIRONMENT):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin, f"{name} lacks {requirement}: run requirements/lock.sh"
        assert requirement.specifier.contains(pin[0], prereleases=True), (
            f"{name} pins {requirement.name}=={pin[0]}, pyproject.toml wants {requirement}: "
            "run requirements/lock.sh"
        )


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_is_hashed(name: str) -> None:
    unhashed = [pkg for pkg, (_, hashes) in read_lock(name).items() if not hashes]
    assert not unhashed, f"{name}: no --hash for {unhashed}"


def test_locks_agree_on_versions() -> None:
    dev = read_lock("dev.txt")
    for name in ("serving.txt", "train.txt", "batch.txt"):
        for pkg, (version, _) in read_lock(name).items():
            if name == "batch.txt" and pkg not in dev:
                continue  # Ray's dashboard (requirements/batch.in): the KubeRay image's alone
            assert dev[pkg][0] == version, f"{name} pins {pkg}=={version}, dev.txt {dev[pkg][0]}"


@pytest.mark.parametrize("name", ["serving.txt", "batch.txt"])
def test_serving_and_batch_locks_have_no_torch_or_cuda(name: str) -> None:
    heavy = [p for p in read_lock(name) if re.match(r"(torch|triton|nvidia-)", p)]
    assert not heavy, f"{name} pulls in {heavy}; the image must not need them"


def test_batch_lock_has_rays_dashboard() -> None:
    # KubeRay submits the RayJob through the head's dashboard, which needs Ray's `default` extra
    pins = read_lock("batch.txt")
    assert {"ray", "aiohttp", "aiohttp-cors", "opencensus", "grpcio"} <= set(pins)


@pytest.mark.parametrize("name", ["train.txt", "dev.txt"])
def test_torch_is_the_cpu_build_of_the_train_extra(name: str) -> None:
    (extra,) = [r for r in required(("train",)) if r.name == "torch"]
    (pinned,) = [s.version for s in extra.specifier if s.operator == "=="]
    version, _ = read_lock(name)["torch"]
    assert version == Version(f"{pinned}+cpu"), f"{name} pins torch=={version}, not {pinned}+cpu"
    assert not [p for p in read_lock(name) if p.startswith("nvidia-")], f"{name} pulls in CUDA"
