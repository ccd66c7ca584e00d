"""Writers racing each other through the API, driven step by step (no sleeps): whatever the
order in which their steps land, every image the gallery answers for has its file."""

import asyncio
import threading

import pytest

from tests.server.support import png_file

pytestmark = pytest.mark.anyio


async def test_a_delete_racing_a_reupload_of_the_same_bytes_leaves_no_image_without_its_file(
    service,
):
    """Upload f (image X). Upload f again and, while that upload is between detecting and
    storing, delete X. The second upload then stores f as a new image Y, whose file must be
    there: the upload used to skip writing the file because it existed, and the delete then
    removed it (14 of 150 rounds, timed from outside)."""
    client = service.client
    services = service.app.state.service_state.services
    upload = png_file(5, name="f.png")
    first = (await client.post("/v1/gallery/images", files={"images": upload})).json()
    x = first["images"][0]["image_id"]

    gallery = services.gallery
    store = gallery.add_images
    storing, stored_may_go_on = threading.Event(), threading.Event()

    def store_after_the_delete(images, **job):
        storing.set()
        assert stored_may_go_on.wait(timeout=30), "the test never let the upload go on"
        return store(images, **job)

    gallery.add_images = store_after_the_delete
    try:
        again = asyncio.ensure_future(client.post("/v1/gallery/images", files={"images": upload}))
        assert await asyncio.to_thread(storing.wait, 30), "the upload never reached the gallery"
        deleted = await client.delete(f"/v1/gallery/images/{x}")
        stored_may_go_on.set()
        answer = (await again).json()["images"][0]
    finally:
        del gallery.add_images

    assert deleted.status_code == 200
    assert answer["added"] is True and answer["image_id"] != x
    y = answer["image_id"]
    assert (await client.get(f"/v1/gallery/images/{y}")).status_code == 200
    served = await client.get(f"/v1/gallery/images/{y}/file")
    assert served.status_code == 200, served.text
    assert served.content == upload[1]


async def test_a_delete_removes_the_file_once_no_image_holds_those_bytes(service):
    client = service.client
    upload = png_file(6, name="g.png")
    added = (await client.post("/v1/gallery/images", files={"images": upload})).json()
    image_id = added["images"][0]["image_id"]
    assert (await client.get(f"/v1/gallery/images/{image_id}/file")).status_code == 200

    assert (await client.delete(f"/v1/gallery/images/{image_id}")).status_code == 200

    assert (await client.get(f"/v1/gallery/images/{image_id}/file")).status_code == 404
    files = service.app.state.settings.gallery_dir / "files"
    assert [path for path in files.rglob("*") if path.is_file()] == []
