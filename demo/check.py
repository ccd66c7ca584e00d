"""The demo's acceptance check: every test query searched through the HTTP API, judged.

A search is right when its top hit is a box of the query's identity (IoU of at least
``MATCH_IOU`` with one of its annotated boxes) in another frame: the PRW protocol, where the
gallery is every test frame but the query's own.
"""

import contextlib
import dataclasses
import shlex
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from common.boxes import iou_matrix
from demo.options import DemoError
from training.datasets import PersonSearchSplit, Query, SceneAnnotation

MATCH_IOU = 0.5  # a hit is a person when it overlaps an annotated box this much
HITS_SHOWN = 5  # hits asked for (top_k) and shown for the printed search


@dataclass(frozen=True)
class SearchRequest:
    """A search as sent: the query image file and the form fields."""

    image: Path
    box: tuple[float, float, float, float]
    exclude_image: int
    top_k: int = HITS_SHOWN

    def fields(self) -> dict[str, str]:
        return {
            "box": ",".join(f"{v:.0f}" for v in self.box),
            "exclude_images": str(self.exclude_image),
            "top_k": str(self.top_k),
        }

    def curl(self, url: str) -> str:
        """The same search as a command line (run from the current folder)."""
        image = self.image.resolve()
        with contextlib.suppress(ValueError):
            image = image.relative_to(Path.cwd())
        parts = ["curl", "-s", f"{url}/v1/search", "-F", f"image=@{image}"]
        for name, value in self.fields().items():
            parts += ["-F", f"{name}={value}"]
        return shlex.join(parts)


@dataclass(frozen=True)
class Outcome:
    """A query's search: its top hits as answered, and whether the first is the right person."""

    query: Query
    request: SearchRequest
    hits: list[dict[str, Any]]
    right: bool


@dataclass(frozen=True)
class CheckResult:
    """Every query's outcome, in test split order, and the search printed for the user."""

    outcomes: list[Outcome]
    shown: Outcome | None

    @property
    def right(self) -> int:
        return sum(outcome.right for outcome in self.outcomes)


Check = Callable[[httpx.AsyncClient], Awaitable[CheckResult]]


def is_right_person(hit: dict[str, Any], frames: dict[str, SceneAnnotation], pid: int) -> bool:
    """Whether a hit's box is a person of identity ``pid`` in its frame (``frames`` by path):
    IoU >= MATCH_IOU with one of that identity's annotated boxes."""
    annotation = frames.get(hit["uri"] or "")
    if annotation is None:
        return False
    boxes = annotation.boxes[annotation.pids == pid].astype(np.float64)
    if not len(boxes):
        return False
    return bool(iou_matrix(hit["box"], boxes).max() >= MATCH_IOU)


async def search(client: httpx.AsyncClient, request: SearchRequest) -> list[dict[str, Any]]:
    """The hits of one search through the API (an error answer is raised with its message)."""
    files = {"image": (request.image.name, request.image.read_bytes(), "image/jpeg")}
    response = await client.post("/v1/search", files=files, data=request.fields())
    if response.status_code == 422 and "no_person_detected" in response.text:
        return []  # the detector found nobody in the query frame: no hit, not an error
    if response.status_code != 200:
        raise DemoError(f"the search failed: {response.status_code} {response.text}")
    return response.json()["hits"]


async def check_search(
    client: httpx.AsyncClient, split: PersonSearchSplit, image_ids: dict[str, int], query_file: Path
) -> CheckResult:
    """Search every test query through the API; write the first one whose top hit is right (or
    the first query, when none is) to ``query_file`` and search it once more from there."""
    names = split.by_name()
    frames = {str(annotation.path): annotation for annotation in split.images}
    outcomes = []
    for query in tqdm(split.queries, desc="searching the test queries", unit="query"):
        path = names[query.image].path
        x1, y1, x2, y2 = (float(v) for v in query.box)
        request = SearchRequest(path, (x1, y1, x2, y2), image_ids[str(path)])
        hits = await search(client, request)
        right = bool(hits) and is_right_person(hits[0], frames, query.pid)
        outcomes.append(Outcome(query, request, hits, right))
    if not outcomes:
        return CheckResult([], None)
    chosen = next((outcome for outcome in outcomes if outcome.right), outcomes[0])
    shutil.copyfile(chosen.request.image, query_file)
    request = dataclasses.replace(chosen.request, image=query_file)
    hits = await search(client, request)
    right = bool(hits) and is_right_person(hits[0], frames, chosen.query.pid)
    return CheckResult(outcomes, Outcome(chosen.query, request, hits, right))


def describe_check(result: CheckResult, url: str, serving: bool) -> str:
    """What the check found, the printed search and its answer, in words."""
    tried = len(result.outcomes)
    shown = result.shown
    if shown is None:
        return "the test split has no queries: nothing to search for"
    position = next(i for i, o in enumerate(result.outcomes) if o.query is shown.query)
    lines = [
        f"searched all {tried} test queries through the API: the top hit is the right person "
        f"for {result.right} of them (top-1 {result.right / tried:.0%})."
    ]
    if result.right:
        lines.append(f"the search below is query {position + 1} of {tried}, the first right one.")
    else:
        lines.append(
            f"NO query found its person at rank 1: the model trained in this budget is too weak "
            f"(more --minutes help). The search below (query 1 of {tried}) does NOT find the "
            "right person."
        )
    where = "" if serving else " (for a running service: this run used an in-process one)"
    lines += [f"\nsearch{where}:", f"  {shown.request.curl(url)}", ""]
    lines.append(
        f"query: person {shown.query.pid} of frame {shown.query.image} "
        f"(box {shown.request.fields()['box']}; its own frame left out with exclude_images)"
    )
    first = "  <- the RIGHT person" if shown.right else "  <- NOT the right person"
    for rank, hit in enumerate(shown.hits, start=1):
        verdict = first if rank == 1 else ""
        box = ",".join(f"{v:.0f}" for v in hit["box"])
        lines.append(
            f"  {rank}. {Path(hit['uri'] or '?').name} box {box} "
            f"similarity {hit['similarity']:.3f}{verdict}"
        )
    if not shown.hits:
        lines.append("  no hits (the detector found nobody in the query frame)")
    return "\n".join(lines)
