"""The web page at ``GET /``, driven in a real headless Chromium against the service running
under uvicorn (the tiny random model of tests/server/support.py, a gallery of two scenes).

The test finds the page's controls by their accessible names (labels, button texts): if a label
goes missing, the test fails. Chromium is Debian's (``apt-get install chromium``), driven by
Playwright's Python package; no browser is downloaded.
"""

import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from export.runtime import Engine
from server.app import create_app
from tests.server.support import API_KEY, MAX_DETECTIONS, encode, make_settings, png_file, scene

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium) to run the page in",
        allow_module_level=True,
    )
playwright = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package drives Chromium (pip install playwright)"
)
expect = playwright.expect

# Offline and quiet: no first-run pages, no background downloads, no updates, no sync.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUERY_WIDTH, QUERY_HEIGHT = 128, 96  # the test scenes' size (support.scene)
GALLERY_CAMERAS = ("east", "west")


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free port of 127.0.0.1, in a thread; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


def _wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ready(url: str) -> bool:
    return httpx.get(f"{url}/readyz").status_code == 200


@pytest.fixture(scope="module")
def api(engine: Engine, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An httpx client (with the API key) of the service under uvicorn, its gallery holding two
    scenes of MAX_DETECTIONS persons each, one per camera of GALLERY_CAMERAS."""
    settings = make_settings(model_dir, tmp_path_factory.mktemp("browser"))
    with serving(create_app(settings, lambda _: engine)) as url:
        _wait_for(lambda: _ready(url), "the service to be ready")
        with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
            files = [("images", png_file(seed)) for seed in (1, 2)]
            added = client.post(
                "/v1/gallery/images", files=files, data={"cameras": GALLERY_CAMERAS}
            )
            assert added.status_code == 200, added.text
            yield client


@pytest.fixture(scope="module")
def browser_context():
    """Chromium with a fresh profile, at a laptop's window size."""
    with (
        tempfile.TemporaryDirectory(prefix="psearch-chromium-") as profile,
        playwright.sync_playwright() as driver,
    ):
        context = driver.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        # Generous: a busy CI machine runs the model slowly; a working page answers far sooner.
        context.set_default_timeout(20_000)
        expect.set_options(timeout=20_000)
        yield context
        context.close()


@pytest.fixture
def page(browser_context, api: httpx.Client):
    """The page, opened with the API key typed in."""
    page = browser_context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(message.text) if message.type == "error" else None,
    )
    page.goto(str(api.base_url))
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("API key").press("Enter")  # "change": the page reloads the gallery counts
    yield page
    page.close()
    assert not [p for p in problems if not _expected_console_error(p)], problems


def _expected_console_error(text: str) -> bool:
    # Chromium logs every failed request; tests that provoke an error answer expect those.
    return "Failed to load resource" in text


@pytest.fixture
def query_file(tmp_path: Path) -> Path:
    path = tmp_path / "query.png"
    path.write_bytes(encode(scene(7, QUERY_WIDTH, QUERY_HEIGHT)))
    return path


def choose_query(page, path: Path) -> None:
    page.get_by_label("Query image").set_input_files(path)
    expect(page.get_by_text(f"{QUERY_WIDTH} × {QUERY_HEIGHT} pixels")).to_be_visible()


def drag_across_query(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag on the query canvas between two points given as fractions of its width and height."""
    area = page.get_by_role("img", name=re.compile("Query preview")).bounding_box()
    (x0, y0), (x1, y1) = (
        (area["x"] + fx * area["width"], area["y"] + fy * area["height"]) for fx, fy in (start, end)
    )
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()


def search(page, top_k: int):
    """Search with ``top_k`` and wait until every match's thumbnail is drawn (its gallery image
    fetched with the API key and cropped); the matches."""
    page.get_by_label("Matches (top_k)").fill(str(top_k))
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.locator("#search-status")).to_contain_text("match")
    hits = page.locator(".hit")
    expect(hits.locator("canvas.thumb[data-state=drawn]")).to_have_count(hits.count())
    return hits


def box_field(page):
    return page.get_by_role("textbox", name="Box")


def numbers(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def test_a_drawn_box_is_searched_and_the_matches_are_shown_best_first(page, api, query_file):
    choose_query(page, query_file)
    # From a quarter of the way in to the middle across, a quarter to three quarters down: in
    # pixels of the 128 x 96 query, (0.25 * 128, 0.25 * 96, 0.5 * 128, 0.75 * 96).
    drag_across_query(page, (0.25, 0.25), (0.5, 0.75))
    box = box_field(page).input_value()
    assert numbers(box) == pytest.approx([32, 24, 64, 72], abs=1)

    hits = search(page, top_k=3)

    # Two scenes of MAX_DETECTIONS persons are in the gallery: top_k=3 fills up.
    expect(hits).to_have_count(3)
    expect(page.locator("#search-status")).to_contain_text("3 matches")
    # The page shows what the API answers for the same query and box, rounded.
    expected = api.post(
        "/v1/search",
        files={"image": ("query.png", query_file.read_bytes(), "image/png")},
        data={"box": box, "top_k": "3"},
    ).json()["hits"]
    shown = [float(text) for text in hits.locator(".similarity dd").all_inner_texts()]
    assert shown == pytest.approx([hit["similarity"] for hit in expected], abs=0.0005 + 1e-6)
    assert shown == sorted(shown, reverse=True)
    first = hits.first
    expect(first.locator(".rank dd")).to_have_text("#1")
    expect(first.locator(".image dd")).to_have_text(re.compile(rf"^{expected[0]['image_id']} · "))
    detection = float(first.locator(".det-score dd").inner_text())
    assert detection == pytest.approx(expected[0]["det_score"], abs=0.005 + 1e-6)


def test_a_typed_box_and_a_camera_filter_are_sent_with_the_search(page, query_file):
    choose_query(page, query_file)
    box_field(page).fill("10,20,50,90")
    page.get_by_label("Cameras").fill("west")

    hits = search(page, top_k=10)

    # Only the west camera's scene can match: its MAX_DETECTIONS persons, however many are asked.
    expect(hits).to_have_count(MAX_DETECTIONS)
    assert set(hits.locator(".camera dd").all_inner_texts()) == {"west"}
    # The tiny model cannot embed a given box: it answers with the detected person nearest to
    # it, and the page says which box was asked for.
    expect(page.locator("#search-status")).to_contain_text("10,20,50,90")


def test_adding_an_image_through_the_page_updates_the_gallery_counts(page, tmp_path):
    images = page.locator("#stat-images")
    expect(images).to_have_text(re.compile(r"^\d+$"))
    before = int(images.inner_text())
    new_scene = tmp_path / "lobby-1.png"
    new_scene.write_bytes(encode(scene(50)))

    page.get_by_label("Scene images").set_input_files(new_scene)
    page.get_by_label("Camera of these images").fill("lobby")
    page.get_by_role("button", name="Add to gallery").click()

    expect(images).to_have_text(str(before + 1))
    expect(page.locator("#added li")).to_have_text(
        re.compile(rf"^lobby-1\.png: image \d+, {MAX_DETECTIONS} persons$")
    )


def test_api_errors_are_shown_in_words_with_their_status(page, query_file):
    choose_query(page, query_file)
    box_field(page).fill("50,20,10,90")  # x2 < x1: the service answers 422
    page.get_by_role("button", name="Search", exact=True).click()
    error = page.get_by_role("alert").filter(has_text="Search failed")
    expect(error).to_contain_text("must have x2 > x1")
    expect(error).to_contain_text("HTTP 422 · invalid_field")

    page.get_by_label("API key").fill("not-the-key")
    page.get_by_label("API key").press("Enter")
    error = page.get_by_role("alert").filter(has_text="Gallery counts unavailable")
    expect(error).to_contain_text("not valid")
    expect(error).to_contain_text("HTTP 403 · forbidden")


def test_on_a_phone_sized_screen_nothing_is_wider_than_the_screen(page, query_file):
    page.set_viewport_size({"width": 375, "height": 740})
    choose_query(page, query_file)
    search(page, top_k=10)
    overflow = page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0
