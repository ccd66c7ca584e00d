"""API keys are checked before a request's body is read, on every operation under /v1/ and on
no other, as the OpenAPI document declares."""

import json

import pytest

from server.app import create_app
from server.settings import ServerSettings
from tests.server.support import API_KEY, make_settings

pytestmark = pytest.mark.anyio

CHUNK = 1024 * 1024
UPLOAD_CHUNKS = 30  # a 30 MiB upload


async def post_upload(app, headers: dict[str, str]) -> tuple[int, dict, int]:
    """POST a 30 MiB multipart body to /v1/gallery/images straight into the ASGI app, in 1 MiB
    chunks; (status, JSON body, chunks the app read)."""
    head = (
        b"--psearch\r\nContent-Disposition: form-data; name=images; filename=big.png\r\n"
        b"Content-Type: image/png\r\n\r\n"
    )
    tail = b"\r\n--psearch--\r\n"
    body = head + b"x" * (UPLOAD_CHUNKS * CHUNK - len(head) - len(tail)) + tail
    chunks = [body[start : start + CHUNK] for start in range(0, len(body), CHUNK)]
    sent = {"chunks": 0}
    answer: dict = {"body": b""}

    async def receive():
        if sent["chunks"] == len(chunks):
            return {"type": "http.disconnect"}
        sent["chunks"] += 1
        more = sent["chunks"] < len(chunks)
        return {"type": "http.request", "body": chunks[sent["chunks"] - 1], "more_body": more}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    raw_headers = {
        "content-type": "multipart/form-data; boundary=psearch",
        "content-length": str(len(body)),
        **headers,
    }
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/gallery/images",
        "raw_path": b"/v1/gallery/images",
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in raw_headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return answer["status"], json.loads(answer["body"]), sent["chunks"]


@pytest.fixture
def app(model_dir, tmp_path):
    """An app whose body limit lets 30 MiB through (so that the limit does not answer first);
    nothing is loaded (its lifespan is not run), which a rejection does not need."""
    return create_app(make_settings(model_dir, tmp_path, max_upload_bytes=64 * CHUNK))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [({}, 401, "unauthenticated"), ({"x-api-key": "guess"}, 403, "forbidden")],
)
async def test_an_upload_without_a_valid_key_is_refused_before_its_body_is_read(
    app, headers, status, code
):
    """FastAPI reads and parses a form before it runs dependencies: the key used to be checked
    after all 30 MiB were received and spooled."""
    answered, body, chunks_read = await post_upload(app, headers)
    assert (answered, body["error"]["code"], chunks_read) == (status, code, 0)


async def test_with_the_key_the_same_upload_is_read(app):
    """The measure above can see a read body: with the key, the app reads all of it (and then
    answers 503, as nothing is loaded here)."""
    answered, body, chunks_read = await post_upload(app, {"x-api-key": API_KEY})
    assert (answered, body["error"]["code"], chunks_read) == (503, "not_ready", UPLOAD_CHUNKS)


def test_every_v1_operation_and_only_those_declare_the_api_key():
    """The middleware guards the paths under /v1/; the document must say the same."""
    document = create_app(ServerSettings()).openapi()
    assert document["components"]["securitySchemes"] == {
        "APIKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "One of the keys the service was configured with (when it has any).",
        }
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            declared = operation.get("security") == [{"APIKeyHeader": []}]
            assert declared == path.startswith("/v1/"), (method, path)
