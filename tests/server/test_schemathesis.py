"""Schemathesis over the service's own OpenAPI document: requests generated from the schema of
every operation, sent in-process to the ASGI app (ready, on the tiny model of
tests/server/support.py, with the API key), must never get a server error, and every answer
must be one the document describes (status, media type, body schema).

Examples are derandomized and few per operation, so that the run is reproducible and short.
"""

import time

import pytest
from hypothesis import HealthCheck, settings

from export.runtime import Engine
from server.app import create_app
from server.settings import ServerSettings
from tests.server.support import API_KEY

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis generates the requests (pip install schemathesis)"
)
from schemathesis.checks import (  # noqa: E402 (only once schemathesis is known to be there)
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_OPERATION = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def api_schema(settings: ServerSettings, engine: Engine):
    """The app's OpenAPI document, loaded from the app itself, once the app is ready (a request
    before that would be answered 503, which is no finding)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings, lambda _: engine))
    readyz = schema["/readyz"]["GET"]
    deadline = time.monotonic() + 30
    while readyz.Case().call().status_code != 200:
        assert time.monotonic() < deadline, "the app did not get ready in 30 s"
        time.sleep(0.02)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_its_schema_says_and_never_with_a_server_error(case):
    case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=CHECKS)
