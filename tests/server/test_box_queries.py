"""Box queries of a two-stage (RoI) model: the service embeds the requested box itself through
the model's ``embed_boxes`` ("GT-box" mode), not the detection that overlaps it most."""

import numpy as np
import pytest

from export.runtime import load_engine
from tests.server.support import make_settings, png_file, running_app, scene, wait_until_ready

pytestmark = pytest.mark.anyio


async def test_a_box_query_is_embedded_through_embed_boxes(
    tiny_seqnet_dir, tmp_path, embedded_boxes
):
    engine = load_engine(tiny_seqnet_dir, "torch", "cpu", batch_size=8, threads=1)
    async with running_app(make_settings(tiny_seqnet_dir, tmp_path), lambda _: engine) as service:
        assert (await wait_until_ready(service.client)).status_code == 200
        added = await service.client.post("/v1/gallery/images", files=[("images", png_file(1))])
        assert added.status_code == 200, added.text
        assert embedded_boxes == []  # detection alone embeds no given box

        box = [10.0, 5.0, 60.0, 90.0]
        response = await service.client.post(
            "/v1/search",
            files={"image": png_file(2)},
            data={"box": ",".join(map(str, box)), "top_k": "5"},
        )
    assert response.status_code == 200, response.text
    result = response.json()
    query = result["query"]
    assert query["method"] == "box"
    assert query["box"] == query["requested_box"] == box
    assert query["iou"] == 1.0 and query["det_score"] is None
    # The model embedded exactly the requested box (the scenes are at the model's input size).
    assert embedded_boxes == [[box]]

    # And the hits are ranked by the cosine with that embedding.
    expected = engine.embed_query(scene(2), np.asarray(box))
    stored = engine.detect([scene(1)])[0].embeddings
    best = float((stored @ expected).max())
    assert result["hits"][0]["similarity"] == pytest.approx(best, abs=1e-5)
