"""``psearch-index search`` with a query image: the model folder embeds the boxed person, a
two-stage model through its ``embed_boxes``, and the gallery must be that model's."""

import json

import numpy as np
import pytest
from PIL import Image

from export.runtime import load_engine
from indexer.cli import main

BOX = [10.0, 5.0, 60.0, 90.0]


def _scene(path, seed: int):
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def indexed(tiny_seqnet_dir, tmp_path):
    """A gallery of one scene added by the tiny SeqNet, and a query scene."""
    gallery = tmp_path / "gallery"
    _scene(tmp_path / "gallery.png", 1)
    model = ["--model", str(tiny_seqnet_dir), "--backend", "torch", "--device", "cpu"]
    added = main(["add", str(tmp_path / "gallery.png"), "--gallery", str(gallery), *model,
                  "--no-progress"])  # fmt: skip
    assert added == 0
    query = _scene(tmp_path / "query.png", 2)
    return gallery, tmp_path / "query.png", query, model


def test_a_boxed_query_image_is_embedded_through_embed_boxes(
    indexed, tiny_seqnet_dir, capsys, embedded_boxes
):
    gallery, query_path, query, model = indexed
    capsys.readouterr()
    box = ",".join(map(str, BOX))
    status = main(["search", str(gallery), str(query_path), *model, "--box", box, "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert embedded_boxes == [[BOX]]  # the scene is at the model's input size: scale 1
    engine = load_engine(tiny_seqnet_dir, "torch", "cpu")
    embedding = engine.embed_query(query, np.asarray(BOX))
    stored = engine.detect([np.array(Image.open(query_path.parent / "gallery.png"))])[0]
    hits = json.loads(out)
    assert len(hits) == len(stored.scores)
    assert hits[0]["similarity"] == pytest.approx(float((stored.embeddings @ embedding).max()))


def test_query_mistakes_are_one_line_errors(indexed, tmp_path, capsys):
    gallery, query_path, _, model = indexed
    embedding = tmp_path / "query.npy"
    np.save(embedding, np.ones(64, np.float32) / 8)
    cases = [
        (["search", str(gallery), str(embedding), "--box", "1,2,3,4"], "needs --model"),
        (["search", str(gallery), str(query_path), *model, "--box", "1,2,x,4"], "--box must be"),
        (["search", str(gallery), str(query_path), *model, "--box", "1,2,3"], "box must be 4"),
        (["search", str(gallery), str(embedding), *model], "not an image"),
        (["search", str(gallery), str(query_path), *model, "--fingerprint", "sha256:0"],
         "not the fingerprint"),
    ]  # fmt: skip
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
