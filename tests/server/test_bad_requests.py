"""A corpus of bad requests: each is answered by a 4xx JSON error of the right status and code,
and the service answers a good search right after it."""

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from tests.server.support import (
    encode,
    make_settings,
    png_file,
    running_app,
    scene,
    wait_until_ready,
)

pytestmark = pytest.mark.anyio

MAX_IMAGES = 3  # images per upload in this module's service
BODY_LIMIT = 256 * 1024  # bytes
IMAGE_BYTES_LIMIT = 128 * 1024  # bytes of one image file
PIXEL_LIMIT = 1_000_000
TOP_K_MAX = 50

GOOD = png_file(1)  # 128 x 96


@dataclass(frozen=True)
class Bad:
    """A bad request and the answer it must get."""

    status: int
    code: str
    method: str = "POST"
    path: str = "/v1/search"
    files: Any = None
    data: dict[str, Any] | None = None
    content: Any = None
    json: Any = None
    headers: dict[str, str | None] = field(default_factory=dict)  # None: header removed


def search_with(**data) -> Bad:
    """A search for GOOD with these form fields, refused as an invalid field."""
    return Bad(422, "invalid_field", files={"image": GOOD}, data=data)


def search_image(status: int, code: str, name: str, content: bytes, media_type: str) -> Bad:
    return Bad(status, code, files={"image": (name, content, media_type)})


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels in its header, with a token IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def jpeg() -> bytes:
    return encode(scene(2), "JPEG")


def tga() -> bytes:
    """A Targa image: Pillow reads it, the service does not (indexer/images.py FORMATS)."""
    buffer = io.BytesIO()
    Image.fromarray(scene(3)).save(buffer, format="TGA")
    return buffer.getvalue()


def chunked_upload(size: int):
    """A multipart body that starts an image part and streams ``size`` bytes of it, without
    Content-Length (chunked)."""

    async def chunks():
        yield (
            b'--zz\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(size // 65536 + 1):
            yield b"x" * 65536

    return chunks()


BAD_REQUESTS = {
    # -- the request body is not a multipart form -------------------------------------------
    "json body": Bad(415, "unsupported_media_type", json={"image": "aGVsbG8="}),
    "urlencoded form": Bad(415, "unsupported_media_type", data={"top_k": "3"}),
    "raw image body": Bad(
        415, "unsupported_media_type", content=GOOD[1], headers={"content-type": "image/png"}
    ),
    "no content type": Bad(415, "unsupported_media_type", content=b"hello"),
    "multipart without boundary": Bad(
        400,
        "bad_request",
        content=b"--x\r\nhello\r\n--x--\r\n",
        headers={"content-type": "multipart/form-data"},
    ),
    # The unfinished part is dropped by the parser: the form has no image.
    "multipart cut short": Bad(
        422,
        "invalid_field",
        content=b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG",
        headers={"content-type": "multipart/form-data; boundary=zz"},
    ),
    # -- the form's fields ------------------------------------------------------------------
    "image missing": Bad(422, "invalid_field", files={"photo": GOOD}),
    "image sent as text": Bad(422, "invalid_field", files={"image": (None, "hello")}),
    "misspelt field": search_with(topk="5"),
    # -- the image ----------------------------------------------------------------------------
    "text file": search_image(415, "unsupported_media_type", "a.txt", b"hello", "text/plain"),
    "pdf file": search_image(
        415, "unsupported_media_type", "a.pdf", b"%PDF-1.4\n", "application/pdf"
    ),
    "tga image": search_image(
        415, "unsupported_media_type", "a.tga", tga(), "application/octet-stream"
    ),
    "empty file": search_image(400, "bad_image", "empty.png", b"", "image/png"),
    "truncated jpeg": search_image(400, "bad_image", "cut.jpg", jpeg()[:600], "image/jpeg"),
    "random bytes as jpeg": search_image(
        400, "bad_image", "x.jpg", bytes(range(256)), "image/jpeg"
    ),
    "png bomb header 100k x 100k": search_image(
        413, "too_large", "bomb.png", png_header(100_000, 100_000), "image/png"
    ),
    "png over the pixel limit": search_image(
        413, "too_large", "big.png", png_header(1001, 1000), "image/png"
    ),
    "image file over max_image_bytes": search_image(
        413, "too_large", "big.png", b"x" * (IMAGE_BYTES_LIMIT + 1), "image/png"
    ),
    # -- the box (the image is 128 x 96) ------------------------------------------------------
    "box right of the image": search_with(box="100,10,129,50"),
    "box below the image": search_with(box="10,10,50,97"),
    "box with a negative corner": search_with(box="-1,10,50,50"),
    "inverted box": search_with(box="50,10,10,50"),
    "box of zero width": search_with(box="10,10,10,50"),
    "box with nan": search_with(box="10,10,nan,50"),
    "box with infinity": search_with(box="10,10,inf,50"),
    "box of three numbers": search_with(box="10,10,50"),
    "box of words": search_with(box="left,top,right,bottom"),
    # -- top_k and the filters ----------------------------------------------------------------
    "top_k zero": search_with(top_k="0"),
    "top_k negative": search_with(top_k="-3"),
    "top_k huge": search_with(top_k=str(10**12)),
    "top_k over the service's maximum": search_with(top_k=str(TOP_K_MAX + 1)),
    "top_k a word": search_with(top_k="ten"),
    "top_k a fraction": search_with(top_k="2.5"),
    "min_similarity above 1": search_with(min_similarity="2"),
    "min_similarity nan": search_with(min_similarity="nan"),
    "since after until": search_with(since="20", until="10"),
    "since infinite": search_with(since="inf"),
    "exclude_images a word": search_with(exclude_images="first"),
    "exclude_images zero": search_with(exclude_images="0"),
    # A NUL ended the name in the gallery's filter: "c1\x00" found c1's images.
    "camera filter with a NUL": search_with(cameras="c1\x00"),
    "camera filter too long": search_with(cameras="c" * 257),
    # -- adding images ------------------------------------------------------------------------
    "add without images": Bad(
        422, "invalid_field", path="/v1/gallery/images", files={"cameras": (None, "door")}
    ),
    "add with 3 cameras for 2 images": Bad(
        422,
        "invalid_field",
        path="/v1/gallery/images",
        files=[("images", png_file(4)), ("images", png_file(5))],
        data={"cameras": ["a", "b", "c"]},
    ),
    # Cameras were unbounded: a 1 MiB camera name was stored and returned with every hit.
    "add with a camera too long": Bad(
        422,
        "invalid_field",
        path="/v1/gallery/images",
        files=[("images", png_file(4))],
        data={"cameras": "c" * 257},
    ),
    "add with a camera holding a NUL": Bad(
        422,
        "invalid_field",
        path="/v1/gallery/images",
        files=[("images", png_file(4))],
        data={"cameras": "c1\x00"},
    ),
    "add with a timestamp word": Bad(
        422,
        "invalid_field",
        path="/v1/gallery/images",
        files=[("images", png_file(4))],
        data={"timestamps": "yesterday"},
    ),
    "add with too many images": Bad(
        413,
        "too_large",
        path="/v1/gallery/images",
        files=[("images", png_file(10 + i)) for i in range(MAX_IMAGES + 1)],
    ),
    "add a text file": Bad(
        415,
        "unsupported_media_type",
        path="/v1/gallery/images",
        files=[("images", ("a.txt", b"hello", "text/plain"))],
    ),
    "add as json": Bad(415, "unsupported_media_type", path="/v1/gallery/images", json={}),
    # -- image ids ----------------------------------------------------------------------------
    "unknown image": Bad(404, "not_found", "GET", "/v1/gallery/images/999"),
    "delete unknown image": Bad(404, "not_found", "DELETE", "/v1/gallery/images/999"),
    "file of unknown image": Bad(404, "not_found", "GET", "/v1/gallery/images/999/file"),
    "image id a word": Bad(422, "invalid_field", "GET", "/v1/gallery/images/first"),
    "image id zero": Bad(422, "invalid_field", "GET", "/v1/gallery/images/0"),
    # -- routes and methods -------------------------------------------------------------------
    "unknown route": Bad(404, "not_found", "GET", "/v2/search"),
    "unknown route under v1": Bad(404, "not_found", "POST", "/v1/gallery/nothing"),
    "wrong method": Bad(405, "method_not_allowed", "PUT", "/v1/search"),
    "get on search": Bad(405, "method_not_allowed", "GET", "/v1/search"),
    # -- API keys -----------------------------------------------------------------------------
    "missing api key": Bad(
        401, "unauthenticated", files={"image": GOOD}, headers={"X-API-Key": None}
    ),
    "wrong api key": Bad(403, "forbidden", files={"image": GOOD}, headers={"X-API-Key": "nope"}),
    "wrong api key on stats": Bad(
        403, "forbidden", "GET", "/v1/gallery/stats", headers={"X-API-Key": "nope"}
    ),
    # -- sizes --------------------------------------------------------------------------------
    "body over the limit": Bad(
        413, "too_large", files={"image": ("big.png", b"x" * (BODY_LIMIT + 1), "image/png")}
    ),
    "chunked body over the limit": Bad(
        413,
        "too_large",
        content=chunked_upload(BODY_LIMIT + 1),
        headers={"content-type": "multipart/form-data; boundary=zz"},
    ),
}


@pytest.fixture(scope="module")
async def service(model_dir, engine, tmp_path_factory):
    """One service for the whole corpus, with a stored image to search."""
    settings = make_settings(
        model_dir,
        tmp_path_factory.mktemp("bad-requests"),
        max_images_per_request=MAX_IMAGES,
        max_upload_bytes=BODY_LIMIT,
        max_image_bytes=IMAGE_BYTES_LIMIT,
        max_image_pixels=PIXEL_LIMIT,
        top_k_max=TOP_K_MAX,
    )
    async with running_app(settings, lambda _: engine) as running:
        await wait_until_ready(running.client)
        added = await running.client.post("/v1/gallery/images", files={"images": png_file(7)})
        assert added.status_code == 200
        yield running


async def send(client, bad: Bad):
    request = client.build_request(
        bad.method, bad.path, files=bad.files, data=bad.data, content=bad.content, json=bad.json
    )
    for name, value in bad.headers.items():
        if value is None:
            del request.headers[name]
        else:
            request.headers[name] = value
    return await client.send(request)


@pytest.mark.parametrize("bad", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_a_bad_request_gets_its_json_error_and_the_service_goes_on(service, bad):
    client = service.client
    response = await send(client, bad)

    assert response.status_code == bad.status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == bad.code
    assert body["error"]["message"]

    good = await client.post("/v1/search", files={"image": GOOD}, data={"top_k": "1"})
    assert good.status_code == 200
    assert len(good.json()["hits"]) == 1


def test_the_corpus_covers_every_error_status():
    statuses = {bad.status for bad in BAD_REQUESTS.values()}
    assert statuses >= {400, 401, 403, 404, 405, 413, 415, 422}
    assert len(BAD_REQUESTS) >= 30


async def test_an_upload_with_one_undecodable_image_stores_none(service):
    client = service.client
    before = (await client.get("/v1/gallery/stats")).json()
    files = [("images", png_file(20)), ("images", ("bad.png", b"not a png", "image/png"))]
    response = await client.post("/v1/gallery/images", files=files)
    assert response.status_code == 400
    assert "image 1 (bad.png)" in response.json()["error"]["message"]
    assert (await client.get("/v1/gallery/stats")).json() == before


async def test_messages_say_what_is_wrong(service):
    """Spot checks of the messages: they name the field and the limit."""
    client = service.client
    cases = {
        "box right of the image": "not inside the 128 x 96 image",
        "top_k over the service's maximum": f"more than this service returns ({TOP_K_MAX})",
        "png bomb header 100k x 100k": "pixels",
        "image file over max_image_bytes": f"is {IMAGE_BYTES_LIMIT + 1} bytes; the limit is",
        "camera filter with a NUL": "cannot contain the character U+0000",
        "add with a camera too long": "at most 256 characters",
        "inverted box": "x2 > x1",
        "missing api key": "X-API-Key",
        "unknown image": "no image with id 999",
        "unknown route": "no route GET /v2/search",
        "wrong method": "PUT is not allowed on /v1/search (allowed: POST)",
    }
    for name, expected in cases.items():
        response = await send(client, BAD_REQUESTS[name])
        assert expected in response.json()["error"]["message"], name
