"""The web page at ``GET /``, driven in a real headless Chromium against the service running
under uvicorn (the tiny random model of tests/server/support.py). Its gallery holds two uploaded
scenes and one scene a bulk job indexed from a server folder.

The test finds the page's controls by their accessible names (labels, button texts): if a label
goes missing, the test fails. Chromium is Debian's (``apt-get install chromium``), driven by
Playwright's Python package (tests/server/browser.py); no browser is downloaded.
"""

import re
import time
from pathlib import Path

import httpx
import pytest

from export.runtime import Engine
from server.app import create_app
from tests.server.browser import (
    chromium,
    require_chromium,
    search_and_wait_for_thumbnails,
    serving,
    watched_page,
)
from tests.server.support import API_KEY, MAX_DETECTIONS, encode, make_settings, png_file, scene

playwright = require_chromium()
expect = playwright.expect

QUERY_WIDTH, QUERY_HEIGHT = 128, 96  # the test scenes' size (support.scene)
GALLERY_CAMERAS = ("east", "west")  # of the uploaded scenes
FOLDER_CAMERA = "yard"  # of the scene indexed from a folder


@pytest.fixture(scope="module")
def api(engine: Engine, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An httpx client (with the API key) of the service under uvicorn, its gallery holding two
    uploaded scenes of MAX_DETECTIONS persons each, one per camera of GALLERY_CAMERAS, and one
    scene of FOLDER_CAMERA indexed by a job from a folder under the service's allowed root."""
    folder = tmp_path_factory.mktemp("browser")
    frames = folder / "frames"
    frames.mkdir()
    (frames / "yard-1.png").write_bytes(encode(scene(3)))
    settings = make_settings(model_dir, folder, allowed_roots=[frames])
    with (
        serving(create_app(settings, lambda _: engine)) as url,
        httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=30) as client,
    ):
        files = [("images", png_file(seed)) for seed in (1, 2)]
        added = client.post("/v1/gallery/images", files=files, data={"cameras": GALLERY_CAMERAS})
        assert added.status_code == 200, added.text
        job = {"paths": [str(frames)], "camera": FOLDER_CAMERA}
        submitted = client.post("/v1/gallery/jobs", json=job)
        assert submitted.status_code == 202, submitted.text
        _wait_for_job(client, submitted.headers["Location"])
        yield client


def _wait_for_job(client: httpx.Client, location: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (job := client.get(location).json())["status"] != "done":
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["added"] == 1, job


@pytest.fixture(scope="module")
def browser_context():
    with chromium(playwright) as context:
        yield context


@pytest.fixture
def page(browser_context, api: httpx.Client):
    """The page, opened with the API key typed in."""
    with watched_page(browser_context, str(api.base_url)) as page:
        page.get_by_label("API key").fill(API_KEY)
        page.get_by_label("API key").press("Enter")  # "change": the page reloads the counts
        yield page


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
    """Search with ``top_k``; the matches, once every thumbnail is drawn."""
    return search_and_wait_for_thumbnails(page, expect, top_k)


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


def test_the_matches_in_a_gallery_indexed_from_a_folder_show_their_pictures(page, query_file):
    choose_query(page, query_file)
    page.get_by_label("Cameras").fill(FOLDER_CAMERA)

    hits = search(page, top_k=10)

    # The scene the job indexed from the server folder: its persons, each drawn from the file
    # the service read under its allowed root.
    expect(hits).to_have_count(MAX_DETECTIONS)
    assert set(hits.locator(".camera dd").all_inner_texts()) == {FOLDER_CAMERA}
    expect(hits.first.locator(".image dd")).to_contain_text("yard-1.png")


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
