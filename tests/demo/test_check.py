"""The demo's acceptance check: its judgement of a hit, and the search it prints."""

import shlex
from pathlib import Path

import numpy as np
import pytest

from demo import check
from training.datasets import SceneAnnotation


@pytest.fixture
def frames() -> dict[str, SceneAnnotation]:
    """One frame: identity 3 at (10, 10)-(30, 70), an unlabeled person at (50, 10)-(70, 70)."""
    frame = SceneAnnotation(
        name="c1s1_000001",
        path=Path("/data/frames/c1s1_000001.jpg"),
        boxes=np.array([[10, 10, 30, 70], [50, 10, 70, 70]], dtype=np.float32),
        pids=np.array([3, -1]),
        camera=1,
    )
    return {str(frame.path): frame}


def hit(box, uri="/data/frames/c1s1_000001.jpg") -> dict:
    return {"uri": uri, "box": box, "similarity": 0.9}


def test_a_hit_on_the_query_identity_is_right(frames):
    assert check.is_right_person(hit([10, 10, 30, 70]), frames, pid=3)
    # Shifted by 5 px: intersection 15 x 60 = 900, union 2 * 1200 - 900 = 1500, IoU 0.6.
    assert check.is_right_person(hit([15, 10, 35, 70]), frames, pid=3)


def test_a_hit_on_someone_else_or_beside_the_person_is_wrong(frames):
    assert not check.is_right_person(hit([50, 10, 70, 70]), frames, pid=3)  # the unlabeled one
    # Shifted by 10 px: intersection 600, union 1800, IoU 1/3 < 0.5.
    assert not check.is_right_person(hit([20, 10, 40, 70]), frames, pid=3)
    assert not check.is_right_person(hit([10, 10, 30, 70]), frames, pid=4)  # not in the frame
    assert not check.is_right_person(hit([10, 10, 30, 70], uri="/elsewhere.jpg"), frames, pid=3)


def test_the_printed_curl_sends_the_same_fields(tmp_path):
    request = check.SearchRequest(tmp_path / "query.jpg", (10.4, 20.0, 50.6, 140.0), 17)

    words = shlex.split(request.curl("http://127.0.0.1:8000"))

    assert words[:3] == ["curl", "-s", "http://127.0.0.1:8000/v1/search"]
    fields = dict(words[i + 1].split("=", 1) for i in range(3, len(words), 2))
    assert fields == {
        "image": f"@{(tmp_path / 'query.jpg').resolve()}",
        "box": "10,20,51,140",  # whole pixels
        "exclude_images": "17",
        "top_k": str(check.HITS_SHOWN),
    }
