"""Fixtures for the service tests: apps over the shared tiny bundles, with settings per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings

MakeClient = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture
def make_client(tiny_bundle: Path) -> MakeClient:
    """`with make_client(max_rows=2) as client:` runs the lifespan with those settings."""

    @contextmanager
    def make(bundle: Path | None = None, **settings: Any) -> Iterator[TestClient]:
        app = create_app(Settings(bundle=bundle or tiny_bundle, **settings))
        with TestClient(app) as client:
            yield client

    return make


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    """A client over the tiny Bernoulli bundle with default settings, shared by a module."""
    with TestClient(create_app(Settings(bundle=tiny_bundle))) as client:
        yield client


@pytest.fixture(scope="module")
def gaussian_client(tiny_gaussian_bundle: Path) -> Iterator[TestClient]:
    """A client over the tiny Gaussian bundle."""
    with TestClient(create_app(Settings(bundle=tiny_gaussian_bundle))) as client:
        yield client
