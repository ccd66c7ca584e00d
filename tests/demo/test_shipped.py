"""The demo's shipped model (demo/model/, demo/shipped.py, demo/ship.py): it loads and answers
its probe frame as its card says, the demo serves it where it fits, and a model shipped by
``python -m demo.ship`` passes the same check (and fails it once tampered with)."""

import json

import pytest

from demo import build, shipped
from demo.options import DemoOptions
from demo.ship import ship
from tests.demo.support import tiny_options


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory):
    """A folder shipped by demo.ship from a tiny demo (seconds of training), and its card."""
    tmp_path = tmp_path_factory.mktemp("ship")
    out = tmp_path / "model"
    card = ship(tiny_options(tmp_path), out, ["--out", str(out)])
    return out, card


def test_a_shipped_folder_carries_its_card_and_fits_the_code_that_made_it(tiny_shipped):
    out, card = tiny_shipped
    assert shipped.read_card(out) == card and shipped.misfits(out) == []
    assert card["api"]["queries"] == card["queries"] > 0
    assert card["training"]["iterations"] > 0 and card["command"].endswith(f"--out {out}")
    assert set(card["figures"]) >= {"mAP", "top1", "det_ap"}


def test_a_model_that_answers_its_probe_otherwise_or_lost_its_card_does_not_fit(
    tiny_shipped, tmp_path
):
    out, card = tiny_shipped
    changed = json.loads(json.dumps(card))
    changed["probe"]["scores"].append(0.5)  # as if today's code found one more person
    changed["fingerprint"] = "sha256:" + "0" * 64
    (tmp_path / shipped.CARD_FILE).write_text(json.dumps(changed))
    for name in (shipped.PROBE_FILE, "psearch.json", "checkpoint.safetensors", "model.onnx"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    problems = shipped.misfits(tmp_path)
    assert len(problems) == 2
    assert "fingerprint" in problems[0] and "probe frame differently (scores" in problems[1]
    (tmp_path / shipped.CARD_FILE).unlink()
    assert shipped.misfits(tmp_path)[0].startswith("it does not load")


def test_the_demo_serves_the_shipped_model_only_for_what_it_was_trained_as(
    tiny_shipped, monkeypatch
):
    out, card = tiny_shipped
    monkeypatch.setattr(build, "SHIPPED_DIR", out)
    monkeypatch.setitem(card, "config", "configs/tiny/alignps_synthetic.yaml")
    (out / shipped.CARD_FILE).write_text(json.dumps(card))
    default = DemoOptions()
    assert build.shipped_model(default) == build.DemoModel(out, card["det_thresh"])
    assert build.shipped_model(DemoOptions(train=True)) is None
    assert build.shipped_model(DemoOptions(seed=card["seed"] + 1)) is None
    assert build.shipped_model(DemoOptions(synthetic={"test_images": 4})) is None
