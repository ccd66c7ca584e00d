"""Fixtures of the service tests: a real exported model, and apps on it (tests/server/support.py
has the helpers)."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from export.runtime import Engine, load_engine
from server.settings import ServerSettings
from tests.server.support import (
    Running,
    make_settings,
    running_app,
    wait_until_ready,
    write_model_folder,
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's loop


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> Engine:
    """The model, loaded once for every app (loading is not what most tests are about)."""
    return load_engine(model_dir, "torch", "cpu", batch_size=8, threads=1)


@pytest.fixture
def settings(model_dir: Path, tmp_path: Path) -> ServerSettings:
    return make_settings(model_dir, tmp_path)


@pytest.fixture
async def service(settings: ServerSettings, engine: Engine) -> AsyncIterator[Running]:
    """A ready app on the shared engine, with an empty gallery."""
    async with running_app(settings, lambda _: engine) as running:
        assert (await wait_until_ready(running.client)).status_code == 200
        yield running


@pytest.fixture
def client(service: Running) -> httpx.AsyncClient:
    return service.client
