"""Distributed ingest on a local Ray instance (2 CPUs) gives the gallery the local pipeline
gives: same images in the same order, same persons, same job records."""

import sqlite3

import numpy as np
import pytest
from PIL import Image

from export.parity import synthetic_images
from export.runtime import load_engine
from indexer.ingest import ingest
from indexer.jobs import JobStore
from indexer.sources import ImageSource
from indexer.store import open_gallery_for

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'psearch[distributed]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: the ray[data] extra")

from indexer.distributed import ingest_ray  # noqa: E402 (needs ray)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def gallery_rows(path):
    """Every image (uri, sha256, camera) and person (image's sha256, box, score, embedding)."""
    with sqlite3.connect(path / "gallery.sqlite") as connection:
        images = connection.execute("SELECT uri, sha256, camera FROM images ORDER BY id").fetchall()
        persons = connection.execute(
            "SELECT i.sha256, p.x1, p.y1, p.x2, p.y2, p.det_score, p.embedding "
            "FROM persons p JOIN images i ON i.id = p.image_id ORDER BY p.id"
        ).fetchall()
    return images, persons


# Ray Data's own context warns of its deprecated settings when it copies itself.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_ray_ingest_builds_the_gallery_the_local_pipeline_builds(tmp_path, model_dir, local_ray):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = []
    for index, pixels in enumerate(synthetic_images([(64, 96)] * 4, seed=11)):
        Image.fromarray(pixels).save(folder / f"{index}.png")
        sources.append(ImageSource(str(folder / f"{index}.png"), "gate"))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    sources.append(ImageSource(str(folder / "broken.png"), "gate"))

    engine = load_engine(model_dir, "torch", "cpu", batch_size=2)
    fingerprint, dim = engine.info.fingerprint, engine.info.dim
    summaries = {}
    for name in ("local", "ray"):
        with open_gallery_for(tmp_path / name, fingerprint, dim) as gallery:
            options = {"batch_size": 2, "job": "j", "progress": False, "min_score": 0.0}
            if name == "local":
                summaries[name] = ingest(gallery, engine, sources, **options)
            else:
                summaries[name] = ingest_ray(
                    gallery, model_dir, sources, backend="torch", **options
                )
            with JobStore(gallery) as jobs:
                items = jobs.items(jobs.find("j").id)
                summaries[name + " job"] = [(i.status, i.image_id, i.error) for i in items]

    local, distributed = summaries["local"], summaries["ray"]
    assert (distributed.added, distributed.persons, distributed.failed) == (4, 24, 1)
    assert (local.added, local.persons, local.failures) == (4, 24, distributed.failures)
    assert summaries["local job"] == summaries["ray job"]
    local_images, local_persons = gallery_rows(tmp_path / "local")
    ray_images, ray_persons = gallery_rows(tmp_path / "ray")
    assert local_images == ray_images
    assert [row[0] for row in local_persons] == [row[0] for row in ray_persons]
    np.testing.assert_allclose(
        [row[1:6] for row in ray_persons], [row[1:6] for row in local_persons], atol=1e-5
    )
    embeddings = [
        [np.frombuffer(row[6], dtype="<f4") for row in rows]
        for rows in (local_persons, ray_persons)
    ]
    np.testing.assert_allclose(embeddings[1], embeddings[0], atol=1e-5)
