"""The demo's web page in a real headless Chromium: a search shows the pictures of its matches,
the frames the demo's gallery was indexed from (the service's allowed root is the dataset).

The demo is built on a few frames with the service tests' tiny random model cached as its run
(tests/demo/support.py), and served with the demo's own settings.
"""

import pytest

from demo import build, serve
from demo.options import Stage, Stages
from server.app import create_app
from tests.demo.support import cache_a_trained_run, tiny_options
from tests.server.browser import (
    chromium,
    require_chromium,
    search_and_wait_for_thumbnails,
    serving,
    watched_page,
)
from training.datasets import load_dataset

playwright = require_chromium()
expect = playwright.expect


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The demo's service under uvicorn, and its test split."""
    options = tiny_options(tmp_path_factory.mktemp("demo"))
    data_root = cache_a_trained_run(options)
    model = build.model_folder(options, data_root, Stages(2))
    split = load_dataset("prw", data_root, "test")
    gallery_dir = build.gallery_folder(options, model.model_dir)
    build.indexed_gallery(model, split, gallery_dir, Stage("index"))
    settings = serve.service_settings(options, model, gallery_dir, data_root)
    with serving(create_app(settings)) as url:
        yield url, split


def test_the_demo_page_shows_the_frames_of_the_matches(demo):
    url, split = demo
    query = split.queries[0]
    frame = split.by_name()[query.image].path
    with chromium(playwright) as context, watched_page(context, url) as page:
        page.get_by_label("Query image").set_input_files(frame)
        page.get_by_role("textbox", name="Box").fill(",".join(f"{v:.0f}" for v in query.box))

        hits = search_and_wait_for_thumbnails(page, expect, top_k=5)

        expect(hits).to_have_count(5)
        drawn = hits.locator("canvas.thumb[data-state=drawn]")
        expect(drawn).to_have_count(5)
        frames = {str(annotation.path) for annotation in split.images}
        shown = [text.split(" · ", 1)[1] for text in hits.locator(".image dd").all_inner_texts()]
        assert set(shown) <= frames  # each picture is a test frame, read from the dataset
