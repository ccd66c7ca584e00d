"""Every endpoint's happy path, on a real (tiny, random) model and a real gallery."""

import asyncio
import re

import numpy as np
import pytest
from PIL import Image

from tests.server.support import (
    MAX_DETECTIONS,
    encode,
    make_settings,
    png_file,
    running_app,
    scene,
    wait_until_ready,
)

pytestmark = pytest.mark.anyio


async def add(client, *files, **form):
    response = await client.post(
        "/v1/gallery/images", files=[("images", file) for file in files], data=form
    )
    assert response.status_code == 200, response.text
    return response.json()["images"]


async def search(client, file, **form):
    response = await client.post("/v1/search", files={"image": file}, data=form)
    assert response.status_code == 200, response.text
    return response.json()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus' text format."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


async def test_an_added_image_is_stored_with_its_detected_persons(client):
    [added] = await add(client, png_file(1, "door.png"), cameras="door", timestamps="1000.5")
    assert added["added"] is True
    assert (added["width"], added["height"]) == (128, 96)
    # Every detection is stored (min_detection_score 0): the model's max_detections of them.
    assert added["num_persons"] == MAX_DETECTIONS

    image = (await client.get(f"/v1/gallery/images/{added['image_id']}")).json()
    assert image["uri"] == "door.png"
    assert (image["camera"], image["timestamp"]) == ("door", 1000.5)
    assert image["sha256"] == added["sha256"]
    assert len(image["persons"]) == MAX_DETECTIONS
    for person in image["persons"]:
        x1, y1, x2, y2 = person["box"]
        assert 0 <= x1 <= x2 <= 128 and 0 <= y1 <= y2 <= 96


async def test_adding_the_same_bytes_again_changes_nothing(client):
    [first] = await add(client, png_file(1))
    [again] = await add(client, png_file(1, "copy.png"))
    assert again["added"] is False
    assert again["image_id"] == first["image_id"]
    stats = (await client.get("/v1/gallery/stats")).json()
    assert (stats["num_images"], stats["num_persons"]) == (1, MAX_DETECTIONS)


async def test_one_request_adds_several_images_with_a_camera_and_time_each(client):
    added = await add(
        client,
        png_file(1),
        png_file(2),
        cameras=["east", "west"],
        timestamps=["10", "20"],
    )
    assert [image["added"] for image in added] == [True, True]
    stored = [
        (await client.get(f"/v1/gallery/images/{image['image_id']}")).json() for image in added
    ]
    assert [(s["camera"], s["timestamp"]) for s in stored] == [("east", 10.0), ("west", 20.0)]


async def test_searching_with_a_gallery_persons_own_box_finds_that_person_first(client):
    """The query is a stored image and the box of one of its persons: the detector finds the
    same box (IoU 1) with the same embedding, so that person comes first, similarity 1."""
    [added] = await add(client, png_file(3))
    image = (await client.get(f"/v1/gallery/images/{added['image_id']}")).json()
    person = image["persons"][2]
    box = ",".join(repr(value) for value in person["box"])

    result = await search(client, png_file(3), box=box, top_k="3")

    assert result["query"]["method"] == "max_iou_detection"
    assert result["query"]["requested_box"] == person["box"]
    assert result["query"]["box"] == person["box"]
    assert result["query"]["iou"] == pytest.approx(1.0)
    top = result["hits"][0]
    assert (top["person_id"], top["image_id"]) == (person["id"], added["image_id"])
    assert top["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert top["box"] == person["box"]
    assert len(result["hits"]) == 3
    similarities = [hit["similarity"] for hit in result["hits"]]
    assert similarities == sorted(similarities, reverse=True)
    assert set(result["timings"]) == {"decode_ms", "embed_ms", "search_ms", "total_ms"}


def server_timing(response) -> dict[str, float]:
    """The Server-Timing header's steps and their milliseconds, in order."""
    entries = [
        entry.strip().split(";dur=") for entry in response.headers["server-timing"].split(",")
    ]
    return {name: float(duration) for name, duration in entries}


async def test_a_search_says_where_its_time_went_step_by_step(client):
    await add(client, png_file(5))
    response = await client.post("/v1/search", files={"image": png_file(5)}, data={"top_k": "1"})
    assert response.status_code == 200, response.text

    steps = server_timing(response)
    assert list(steps) == [
        "receive", "decode", "queue", "engine", "wake", "search", "respond", "total",
    ]  # fmt: skip
    assert all(milliseconds >= 0 for milliseconds in steps.values())
    total = steps.pop("total")
    assert sum(steps.values()) == pytest.approx(total, abs=0.01)  # each rounded to 1 us
    timings = response.json()["timings"]
    assert timings["decode_ms"] == pytest.approx(steps["decode"], abs=0.002)
    embedding = steps["queue"] + steps["engine"] + steps["wake"]
    assert timings["embed_ms"] == pytest.approx(embedding, abs=0.005)
    assert timings["search_ms"] == pytest.approx(steps["search"], abs=0.002)


async def test_every_answer_says_how_long_it_took(client):
    for response in (await client.get("/healthz"), await client.get("/v1/gallery/images/999")):
        assert list(server_timing(response)) == ["total"]


async def test_a_search_without_a_box_takes_the_whole_image_as_the_person(client):
    await add(client, png_file(4))
    crop = ("crop.png", encode(scene(5, width=40, height=90)), "image/png")
    result = await search(client, crop, top_k="2")
    query = result["query"]
    assert query["requested_box"] == [0, 0, 40, 90]
    assert (query["width"], query["height"]) == (40, 90)
    assert 0 <= query["iou"] <= 1 and query["det_score"] > 0
    assert len(result["hits"]) == 2


async def test_search_filters_by_camera_time_image_and_similarity(client):
    east, west = await add(
        client, png_file(6), png_file(7), cameras=["east", "west"], timestamps=["10", "20"]
    )
    query = png_file(8)

    async def image_ids(**form):
        hits = (await search(client, query, top_k="50", **form))["hits"]
        return {hit["image_id"] for hit in hits}

    assert await image_ids() == {east["image_id"], west["image_id"]}
    assert await image_ids(cameras="west") == {west["image_id"]}
    assert await image_ids(since="15") == {west["image_id"]}
    assert await image_ids(until="15") == {east["image_id"]}
    assert await image_ids(exclude_images=str(east["image_id"])) == {west["image_id"]}
    assert await image_ids(cameras="north") == set()

    # A threshold at the second hit's similarity keeps exactly the first two hits.
    hits = (await search(client, query, top_k="50"))["hits"]
    threshold = hits[1]["similarity"]
    kept = (await search(client, query, top_k="50", min_similarity=repr(threshold)))["hits"]
    assert [hit["person_id"] for hit in kept] == [hit["person_id"] for hit in hits[:2]]


async def test_the_file_of_an_uploaded_image_is_served_back(client):
    file = png_file(9)
    [added] = await add(client, file)
    response = await client.get(f"/v1/gallery/images/{added['image_id']}/file")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == file[1]


async def test_a_removed_image_is_gone_with_its_persons_and_file(client):
    kept, removed = await add(client, png_file(10), png_file(11))
    response = await client.delete(f"/v1/gallery/images/{removed['image_id']}")
    assert response.status_code == 200
    assert response.json() == {"image_id": removed["image_id"], "num_persons": MAX_DETECTIONS}

    for path in ("", "/file"):
        gone = await client.get(f"/v1/gallery/images/{removed['image_id']}{path}")
        assert gone.status_code == 404
    hits = (await search(client, png_file(12), top_k="50"))["hits"]
    assert {hit["image_id"] for hit in hits} == {kept["image_id"]}
    stats = (await client.get("/v1/gallery/stats")).json()
    assert (stats["num_images"], stats["num_persons"]) == (1, MAX_DETECTIONS)


async def test_stats_describe_the_gallery_and_its_model(client, engine):
    await add(client, png_file(13))
    stats = (await client.get("/v1/gallery/stats")).json()
    assert stats["num_images"] == 1
    assert stats["num_persons"] == stats["indexed"] == MAX_DETECTIONS
    assert stats["dim"] == engine.info.dim
    assert stats["fingerprint"] == engine.info.fingerprint
    assert stats["index_type"] == "flat"


async def test_health_readiness_and_openapi(client, engine):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready"
    assert ready["model"] == {
        "name": "alignps",
        "fingerprint": engine.info.fingerprint,
        "dim": engine.info.dim,
        "backend": "torch",
        "device": "cpu",
        "detection_threshold": None,  # the test folder recommends none
    }
    assert ready["min_detection_score"] == 0.0  # the test settings'
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths) == {
        "/v1/search",
        "/v1/gallery/images",
        "/v1/gallery/images/{image_id}",
        "/v1/gallery/images/{image_id}/file",
        "/v1/gallery/stats",
        "/v1/gallery/jobs",
        "/v1/gallery/jobs/{job_id}",
        "/v1/gallery/jobs/{job_id}/cancel",
        "/healthz",
        "/readyz",
        "/metrics",
    }


async def test_metrics_count_requests_by_route_template_and_the_gallery(client):
    [added] = await add(client, png_file(14))
    for _ in range(2):
        await client.get(f"/v1/gallery/images/{added['image_id']}")
    await client.get("/v1/gallery/images/999")
    await client.get("/no/such/route")

    text = (await client.get("/metrics")).text

    def requests(route: str, status: int, method: str = "GET") -> float:
        labels = f'method="{method}",route="{route}",status="{status}"'
        return metric(text, f"psearch_requests_total{{{labels}}}")

    assert requests("/v1/gallery/images/{image_id}", 200) == 2
    assert requests("/v1/gallery/images/{image_id}", 404) == 1
    assert requests("/v1/gallery/images", 200, "POST") == 1
    assert requests("<unmatched>", 404) == 1
    assert metric(text, "psearch_gallery_images") == 1
    assert metric(text, "psearch_gallery_persons") == MAX_DETECTIONS
    assert metric(text, "psearch_inference_queue_depth") == 0
    assert metric(text, "psearch_ready") == 1
    assert "psearch_request_duration_seconds_bucket" in text


async def test_uploads_in_every_pixel_format_are_indexed(client):
    """16-bit greyscale, alpha, CMYK, palette and an EXIF-rotated JPEG in one upload; the
    rotated one (stored 128 x 96, orientation 6) is indexed as the 96 x 128 image it shows."""
    rgb = scene(15)
    sixteen_bit = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6
    files = [
        ("grey16.png", encode(sixteen_bit), "image/png"),
        ("alpha.png", encode(Image.fromarray(rgb).convert("RGBA")), "image/png"),
        ("cmyk.jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "image/jpeg"),
        ("palette.gif", encode(Image.fromarray(rgb).convert("P"), "GIF"), "image/gif"),
        ("rotated.jpg", encode(rotated, "JPEG", exif=exif), "image/jpeg"),
    ]
    added = await add(client, *files)
    sizes = [(image["width"], image["height"]) for image in added]
    assert sizes == [(128, 96)] * 4 + [(96, 128)]
    assert all(image["num_persons"] == MAX_DETECTIONS for image in added)


async def test_concurrent_searches_are_answered_in_shared_batches(client):
    """Six searches at once: each is answered, and the worker ran fewer than six batches."""
    await add(client, png_file(16))
    results = await asyncio.gather(*(search(client, png_file(20 + i), top_k="1") for i in range(6)))
    assert all(len(result["hits"]) == 1 for result in results)

    text = (await client.get("/metrics")).text
    # The add's detection was a batch of one; then the six queries.
    assert metric(text, "psearch_inference_batch_size_sum") == 1 + 6
    assert metric(text, "psearch_inference_batch_size_count") < 1 + 6


async def test_an_indexed_server_file_is_served_while_it_is_unchanged(model_dir, tmp_path, engine):
    """An image indexed from a path (as bulk indexing will) is served from that path when it is
    under an allowed root and still has the bytes that were indexed."""
    allowed = tmp_path / "cameras"
    allowed.mkdir()
    inside, outside = allowed / "frame.png", tmp_path / "frame.png"
    inside.write_bytes(encode(scene(30)))
    outside.write_bytes(encode(scene(31)))
    settings = make_settings(model_dir, tmp_path, allowed_roots=[allowed])
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        gallery = service.app.state.service_state.services.gallery
        ids = [
            gallery.add_image(path, engine.detect([scene(0)])[0], width=128, height=96).image_id
            for path in (inside, outside)
        ]

        served = await service.client.get(f"/v1/gallery/images/{ids[0]}/file")
        assert served.status_code == 200
        assert served.content == inside.read_bytes()
        refused = await service.client.get(f"/v1/gallery/images/{ids[1]}/file")
        assert refused.status_code == 404
        message = refused.json()["error"]["message"]
        assert "outside the allowed roots" in message and "add its folder to" in message

        inside.write_bytes(encode(scene(32)))  # changed since indexed: no longer that image
        changed = await service.client.get(f"/v1/gallery/images/{ids[0]}/file")
        assert changed.status_code == 404
        assert "has changed since it was indexed" in changed.json()["error"]["message"]


async def test_a_symlink_under_an_allowed_root_to_a_file_outside_is_not_served(
    model_dir, tmp_path, engine
):
    allowed = tmp_path / "cameras"
    allowed.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(scene(33)))
    (allowed / "link.png").symlink_to(secret)
    settings = make_settings(model_dir, tmp_path, allowed_roots=[allowed])
    async with running_app(settings, lambda _: engine) as service:
        await wait_until_ready(service.client)
        gallery = service.app.state.service_state.services.gallery
        found = engine.detect([scene(0)])[0]
        added = gallery.add_image(allowed / "link.png", found, width=128, height=96)

        refused = await service.client.get(f"/v1/gallery/images/{added.image_id}/file")
        assert refused.status_code == 404
        assert "outside the allowed roots" in refused.json()["error"]["message"]
