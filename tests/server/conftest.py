"""Fixtures of the service tests."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's loop
