"""The web page's router: what it serves, without a browser (tests/server/test_ui_browser.py
drives the page itself)."""

import re

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(settings: ServerSettings):
    """A client of an app that is not started: the page needs neither model nor gallery."""
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://psearch") as client:
        yield client


async def test_the_page_is_served_at_the_root_and_may_load_only_its_own_files(client):
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    # Everything the page links to is its own (the icon is an empty data: URL), and is served.
    own = {"/static/app.js": "text/javascript", "/static/style.css": "text/css"}
    linked = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert sorted(linked) == sorted([*own, "data:,"])
    for path, media_type in own.items():
        served = await client.get(path)
        assert served.status_code == 200
        assert served.headers["content-type"].startswith(media_type)


async def test_only_the_pages_own_files_are_served_from_static(client):
    for path in ("/static/index.js", "/static/..%2Fapp.py", "/static/"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


async def test_the_page_is_not_part_of_the_api_document(client):
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert not [path for path in paths if path.startswith("/static")]
