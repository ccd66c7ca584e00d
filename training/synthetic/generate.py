"""Generate a synthetic person search dataset in the on-disk format of CUHK-SYSU, PRW or
CrowdHuman, so that every loader, trainer and evaluator runs on it unchanged.

The task is meant to be fair but not trivial: identities share attributes (a fifth or more share
their shirt colour), appear in several scenes or cameras under different poses, scales (3x),
lighting and camera colour responses, are partly occluded by each other and by props, and stand
among unlabeled passers-by, mannequins, posters and person-sized props. Train and test
identities are disjoint. Output is a pure function of the seed and the options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.synthetic.identity import Identity, random_identity, sample_identities
from training.synthetic.plan import fill_unlabeled, person_counts, spread_identities
from training.synthetic.render import sample_pose
from training.synthetic.scene import (
    UNLABELED,
    PersonPlacement,
    RenderedScene,
    choose_feet,
    occluders_for,
    render_scene,
)
from training.synthetic.scenery import (
    Backdrop,
    ColorTransform,
    View,
    check_person_heights,
    make_backdrop,
    paint_distant_crowd,
    sample_color_transform,
    sample_view,
)
from training.synthetic.writers import SceneRecord, write_crowdhuman, write_cuhk_sysu, write_prw

FORMATS = ("cuhk_sysu", "prw", "crowdhuman")
QUERY_MIN_VISIBILITY = 0.75


@dataclass(frozen=True)
class SyntheticOptions:
    """Size and difficulty of a generated dataset; each format has its own defaults.

    Persons are ``min_person`` to ``max_person`` pixels tall (times each identity's build, 0.9 to
    1.1), ``min_persons`` to ``max_persons`` per image, of which about ``labeled_fraction`` are
    labeled identities. ``max_cover`` bounds how much of a person's box nearer persons may cover
    (1 disables the bound); ``occluder_rate`` is the share of persons with a prop placed just in
    front of them; ``props`` the mean number of other props per backdrop. ``cameras`` is used by
    PRW (identities appear in two or more), ``gallery_sizes`` by CUHK-SYSU (50 is required).
    For CrowdHuman, the test split is written as "val" and identities are not used.
    """

    train_identities: int = 120
    test_identities: int = 80
    train_images: int = 480
    test_images: int = 240
    width: int = 384
    height: int = 256
    min_person: float = 40.0
    max_person: float = 120.0
    min_persons: int = 2
    max_persons: int = 7
    labeled_fraction: float = 0.5
    max_cover: float = 0.6
    occluder_rate: float = 0.2
    props: float = 4.0
    cameras: int = 6
    gallery_sizes: tuple[int, ...] = (50, 100)
    progress: bool = True

    def __post_init__(self) -> None:
        counts = ("train_identities", "test_identities", "train_images", "test_images")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.width < 32 or self.height < 32:
            raise ValueError(
                f"image size must be at least 32 x 32, got {self.width} x {self.height}"
            )
        if not 0.0 <= self.labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction must be in [0, 1], got {self.labeled_fraction}")
        if not 0.0 <= self.occluder_rate <= 1.0:
            raise ValueError(f"occluder_rate must be in [0, 1], got {self.occluder_rate}")
        if self.max_cover <= 0:
            raise ValueError(f"max_cover must be > 0, got {self.max_cover}")
        if self.cameras < 1:
            raise ValueError(f"cameras must be >= 1, got {self.cameras}")
        if not 1 <= self.min_persons <= self.max_persons:
            raise ValueError(
                f"persons per image must satisfy 1 <= min_persons ({self.min_persons}) "
                f"<= max_persons ({self.max_persons})"
            )
        check_person_heights(self.min_person, self.max_person, self.height)


_FORMAT_DEFAULTS: dict[str, dict[str, object]] = {
    "cuhk_sysu": {},
    "prw": {
        "train_identities": 100,
        "test_identities": 60,
        "train_images": 480,
        "test_images": 300,
        "labeled_fraction": 0.75,
    },
    "crowdhuman": {
        "train_identities": 0,
        "test_identities": 0,
        "train_images": 300,
        "test_images": 100,
        "min_persons": 6,
        "max_persons": 16,
        "labeled_fraction": 0.0,
        "max_cover": 0.9,
        "occluder_rate": 0.15,
    },
}


def default_options(format: str) -> SyntheticOptions:
    """The default size and difficulty of ``format``: a dataset that trains in minutes on CPU."""
    _check_format(format)
    return SyntheticOptions(**_FORMAT_DEFAULTS[format])


def generator_fingerprint() -> str:
    """A short hash of this package's source code: part of a cached dataset's name, so that a
    changed generator never reuses what an older one wrote for the same seed and options."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def make_options(format: str, **overrides: object) -> SyntheticOptions:
    """``format``'s defaults with ``overrides`` applied; unknown option names are errors."""
    known = {f.name for f in dataclasses.fields(SyntheticOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown synthetic options {unknown}; known: {sorted(known)}")
    if "gallery_sizes" in overrides:
        overrides["gallery_sizes"] = tuple(int(size) for size in overrides["gallery_sizes"])
    return dataclasses.replace(default_options(format), **overrides)


@dataclass(frozen=True)
class SplitSummary:
    """What one split holds. ``occluded`` counts persons with less than 90% of their pixels
    visible; ``heights`` is the (min, max) box height in pixels."""

    images: int
    persons: int
    labeled: int
    identities: int
    queries: int
    ignore_regions: int
    occluded: int
    heights: tuple[float, float]


@dataclass(frozen=True)
class Summary:
    """The result of :func:`generate`: where it went, what each split holds, who is in it.

    ``identities`` maps "train" and "test" to the labeled identity tables (index = the pid
    written to disk minus the first pid of the split) and "unlabeled" to the passers-by.
    """

    format: str
    root: Path
    seed: int
    options: SyntheticOptions
    splits: dict[str, SplitSummary]
    identities: dict[str, list[Identity]]
    seconds: float

    def __str__(self) -> str:
        lines = [
            f"synthetic {self.format} (seed {self.seed}) -> {self.root} in {self.seconds:.1f} s"
        ]
        header = (
            f"{'split':<6} {'images':>6} {'persons':>7} {'labeled':>7} {'ids':>5} {'queries':>7}"
        )
        lines.append(header + f" {'ignore':>6} {'occluded':>8}  heights")
        for name, s in self.splits.items():
            lines.append(
                f"{name:<6} {s.images:>6} {s.persons:>7} {s.labeled:>7} {s.identities:>5} "
                f"{s.queries:>7} {s.ignore_regions:>6} {s.occluded:>8}  "
                f"{s.heights[0]:.0f}-{s.heights[1]:.0f} px"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Setting:
    """Where a frame is shot: the camera geometry, the backdrop and the colour response."""

    view: View
    backdrop: Backdrop
    transform: ColorTransform


@dataclass(frozen=True)
class _Frame:
    """A planned image: its file name, camera (-1 if none) and persons (identity, pid)."""

    name: str
    camera: int
    persons: list[tuple[Identity, int]]


# Renders frame number ``index`` of random stream ``stream``: (scene, ignore boxes (m, 4)).
_FrameRenderer = Callable[[int, int, _Frame], tuple[RenderedScene, np.ndarray]]
_NO_BOXES = np.zeros((0, 4), dtype=np.float32)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown synthetic format {format!r}; expected one of {FORMATS}")


def generate(format: str, out: str | Path, seed: int = 0, **options: object) -> Summary:
    """Write a synthetic dataset in ``format`` ("cuhk_sysu", "prw", "crowdhuman") under ``out``.

    ``options`` override :func:`default_options` (see :class:`SyntheticOptions`). The same seed
    and options give the same files.
    """
    _check_format(format)
    opts = make_options(format, **options)
    start = time.perf_counter()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    writer = {
        "cuhk_sysu": _generate_cuhk_sysu,
        "prw": _generate_prw,
        "crowdhuman": _generate_crowdhuman,
    }
    splits, identities = writer[format](root, seed, opts)
    return Summary(format, root, seed, opts, splits, identities, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Identities and planning shared by the person search formats


def _identity_tables(rng: np.random.Generator, opts: SyntheticOptions) -> dict[str, list[Identity]]:
    train = sample_identities(rng, opts.train_identities)
    test = sample_identities(rng, opts.test_identities, avoid=train)
    return {"train": train, "test": test}


def _plan_split(
    rng: np.random.Generator,
    opts: SyntheticOptions,
    identities: list[Identity],
    first_pid: int,
    cameras: np.ndarray,
    min_cameras: int,
    avoid: list[Identity],
) -> tuple[list[list[tuple[Identity, int]]], list[Identity]]:
    """Persons (identity, pid) for each image of a split, and the split's unlabeled pool."""
    counts = person_counts(rng, len(cameras), opts.min_persons, opts.max_persons)
    labeled = spread_identities(
        rng, counts, cameras, len(identities), opts.labeled_fraction, min_cameras=min_cameras
    )
    unlabeled, pool_size = fill_unlabeled(rng, counts, labeled)
    pool = sample_identities(rng, pool_size, avoid=avoid)
    persons = [
        [(identities[i], first_pid + i) for i in shown] + [(pool[j], UNLABELED) for j in extra]
        for shown, extra in zip(labeled, unlabeled, strict=True)
    ]
    return persons, pool


def _random_setting(
    rng: np.random.Generator, opts: SyntheticOptions, color_strength: float
) -> _Setting:
    view = sample_view(rng, opts.width, opts.height, opts.min_person, opts.max_person)
    backdrop = make_backdrop(rng, view, props=opts.props)
    return _Setting(view, backdrop, sample_color_transform(rng, color_strength))


def _frame_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Each frame draws from its own stream, so frames do not depend on one another."""
    return np.random.default_rng([seed, stream, index])


def _render_persons(
    rng: np.random.Generator, frame: _Frame, setting: _Setting, opts: SyntheticOptions
) -> RenderedScene:
    """Place the frame's persons (and props in front of some) in the setting and render."""
    view = setting.view
    feet = choose_feet(rng, view, len(frame.persons), opts.max_cover)
    placements = [
        PersonPlacement(identity, pid, foot, sample_pose(rng), float(rng.uniform(0.88, 1.12)))
        for (identity, pid), foot in zip(frame.persons, feet, strict=True)
    ]
    props = occluders_for(rng, view, feet, opts.occluder_rate)
    return render_scene(rng, view, setting.backdrop, placements, props, setting.transform)


def _render_all(
    frames: Sequence[tuple[int, _Frame]],
    render: _FrameRenderer,
    pixels: np.ndarray,
    desc: str,
    progress: bool,
) -> list[tuple[SceneRecord, np.ndarray]]:
    """Render ``frames`` ((stream, frame) pairs) into ``pixels`` (n, H, W, 3), with progress.

    Returns each scene as a record (its image a view into ``pixels``) and its visibilities.
    """
    records = []
    progress_bar = tqdm(frames, desc=desc, unit="img", disable=not progress)
    for index, (stream, frame) in enumerate(progress_bar):
        scene, ignore = render(stream, index, frame)
        pixels[index] = scene.image
        record = SceneRecord(
            frame.name, pixels[index], scene.boxes, scene.pids, frame.camera, ignore
        )
        records.append((record, scene.visibility))
    return records


def _choose_queries(
    rng: np.random.Generator, records: list[tuple[SceneRecord, np.ndarray]], pids: range
) -> list[tuple[int, str, np.ndarray]]:
    """One query per identity: a random well-visible appearance (the most visible if none is)."""
    seen: dict[int, list[tuple[float, str, np.ndarray]]] = {pid: [] for pid in pids}
    for record, visibility in records:
        for pid, box, visible in zip(record.pids.tolist(), record.boxes, visibility, strict=True):
            if pid in seen:
                seen[pid].append((float(visible), record.name, box))
    queries = []
    for pid, sightings in seen.items():
        if len(sightings) < 2:
            raise ValueError(f"test identity {pid} appears {len(sightings)} time(s); needs >= 2")
        good = [s for s in sightings if s[0] >= QUERY_MIN_VISIBILITY] or [
            max(sightings, key=lambda s: s[0])
        ]
        _, name, box = good[int(rng.integers(len(good)))]
        queries.append((pid, name, box))
    return queries


def _summarize(
    records: list[tuple[SceneRecord, np.ndarray]], identities: int, queries: int
) -> SplitSummary:
    pids = np.concatenate([r.pids for r, _ in records]) if records else np.zeros(0, np.int64)
    boxes = np.concatenate([r.boxes for r, _ in records]) if records else np.zeros((0, 4))
    visibility = np.concatenate([v for _, v in records]) if records else np.zeros(0)
    heights = boxes[:, 3] - boxes[:, 1]
    return SplitSummary(
        images=len(records),
        persons=len(pids),
        labeled=int((pids >= 0).sum()),
        identities=identities,
        queries=queries,
        ignore_regions=sum(len(r.ignore_boxes) for r, _ in records),
        occluded=int((visibility < 0.9).sum()),
        heights=(float(heights.min()), float(heights.max())) if len(heights) else (0.0, 0.0),
    )


def _pixel_buffer(folder: str, count: int, opts: SyntheticOptions) -> np.ndarray:
    """(count, H, W, 3) uint8 on disk, so that large datasets do not have to fit in memory."""
    shape = (max(count, 1), opts.height, opts.width, 3)
    return np.lib.format.open_memmap(
        Path(folder) / "pixels.npy", mode="w+", dtype=np.uint8, shape=shape
    )


# ---------------------------------------------------------------------------------------------
# CUHK-SYSU

_SplitResult = tuple[dict[str, SplitSummary], dict[str, list[Identity]]]


def _generate_cuhk_sysu(root: Path, seed: int, opts: SyntheticOptions) -> _SplitResult:
    """Scenes named s1..sN in shuffled order; each scene its own street, camera and light."""
    rng = np.random.default_rng([seed, 0])
    tables = _identity_tables(rng, opts)
    first_test, total = opts.train_identities, opts.train_images + opts.test_images
    names = [f"s{k}" for k in rng.permutation(total) + 1]
    known = tables["train"] + tables["test"]
    no_cameras = np.zeros(opts.train_images, dtype=np.int64)
    train_persons, train_pool = _plan_split(rng, opts, tables["train"], 0, no_cameras, 1, known)
    no_cameras = np.zeros(opts.test_images, dtype=np.int64)
    test_persons, test_pool = _plan_split(
        rng, opts, tables["test"], first_test, no_cameras, 1, known + train_pool
    )
    frames = [(1, _Frame(name, -1, p)) for name, p in zip(names, train_persons, strict=False)]
    test_names = names[opts.train_images :]
    frames += [(2, _Frame(name, -1, p)) for name, p in zip(test_names, test_persons, strict=True)]

    def render(stream: int, index: int, frame: _Frame) -> tuple[RenderedScene, np.ndarray]:
        frame_rng = _frame_rng(seed, stream, index)
        setting = _random_setting(frame_rng, opts, color_strength=0.6)
        return _render_persons(frame_rng, frame, setting, opts), _NO_BOXES

    with tempfile.TemporaryDirectory() as folder:
        pixels = _pixel_buffer(folder, total, opts)
        rendered = _render_all(frames, render, pixels, "cuhk_sysu", opts.progress)
        train, test = rendered[: opts.train_images], rendered[opts.train_images :]
        queries = _choose_queries(rng, test, range(first_test, first_test + opts.test_identities))
        scenes = [record for record, _ in rendered]
        write_cuhk_sysu(root, scenes, test_names, queries, opts.gallery_sizes, seed)
    splits = {
        "train": _summarize(train, opts.train_identities, 0),
        "test": _summarize(test, opts.test_identities, len(queries)),
    }
    return splits, {**tables, "unlabeled": train_pool + test_pool}


# ---------------------------------------------------------------------------------------------
# PRW


def _prw_names(rng: np.random.Generator, cameras: np.ndarray, train: int) -> list[str]:
    """c{cam}s{seq}_{frame:06d} names: per camera, frames in time order, train before test,
    a new sequence every 40 frames and at the split boundary."""
    names = [""] * len(cameras)
    for camera in np.unique(cameras).tolist():
        seq, frame, in_seq, previous = 1, int(rng.integers(1, 8)) * 25, 0, None
        for index in np.flatnonzero(cameras == camera).tolist():
            is_train = index < train
            if in_seq == 40 or (previous is not None and is_train != previous):
                seq, frame, in_seq = seq + 1, int(rng.integers(1, 8)) * 25, 0
            names[index] = f"c{camera}s{seq}_{frame:06d}"
            frame += 25 * int(rng.integers(1, 7))
            in_seq, previous = in_seq + 1, is_train
    return names


def _generate_prw(root: Path, seed: int, opts: SyntheticOptions) -> _SplitResult:
    """Frames from fixed cameras (one street, one colour response each); every identity is
    seen by at least two cameras."""
    rng = np.random.default_rng([seed, 0])
    tables = _identity_tables(rng, opts)
    first_test, min_cameras = opts.train_identities, min(2, opts.cameras)
    train_cameras = rng.permutation(np.arange(opts.train_images) % opts.cameras) + 1
    test_cameras = rng.permutation(np.arange(opts.test_images) % opts.cameras) + 1
    cameras = np.concatenate([train_cameras, test_cameras])
    names = _prw_names(rng, cameras, opts.train_images)
    known = tables["train"] + tables["test"]
    train_persons, train_pool = _plan_split(
        rng, opts, tables["train"], 0, train_cameras, min_cameras, known
    )
    test_persons, test_pool = _plan_split(
        rng, opts, tables["test"], first_test, test_cameras, min_cameras, known + train_pool
    )
    settings = {
        camera: _random_setting(_frame_rng(seed, 3, camera), opts, color_strength=1.0)
        for camera in range(1, opts.cameras + 1)
    }
    frames = [
        (1 if i < opts.train_images else 2, _Frame(name, int(camera), persons))
        for i, (name, camera, persons) in enumerate(
            zip(names, cameras, train_persons + test_persons, strict=True)
        )
    ]

    def render(stream: int, index: int, frame: _Frame) -> tuple[RenderedScene, np.ndarray]:
        frame_rng = _frame_rng(seed, stream, index)
        camera = settings[frame.camera]
        # A fixed camera still drifts a little in brightness from frame to frame.
        drift = float(frame_rng.uniform(0.94, 1.06))
        transform = dataclasses.replace(camera.transform, matrix=camera.transform.matrix * drift)
        setting = dataclasses.replace(camera, transform=transform)
        return _render_persons(frame_rng, frame, setting, opts), _NO_BOXES

    with tempfile.TemporaryDirectory() as folder:
        pixels = _pixel_buffer(folder, len(frames), opts)
        rendered = _render_all(frames, render, pixels, "prw", opts.progress)
        train, test = rendered[: opts.train_images], rendered[opts.train_images :]
        queries = _choose_queries(rng, test, range(first_test, first_test + opts.test_identities))
        scenes = [record for record, _ in rendered]
        write_prw(root, scenes, names[: opts.train_images], names[opts.train_images :], queries)
    splits = {
        "train": _summarize(train, opts.train_identities, 0),
        "test": _summarize(test, opts.test_identities, len(queries)),
    }
    return splits, {**tables, "unlabeled": train_pool + test_pool}


# ---------------------------------------------------------------------------------------------
# CrowdHuman


def _crowdhuman_name(seed: int, split: str, index: int) -> str:
    """An ID shaped like CrowdHuman's ("284193,e6b7f000d8a2b2f7"): a number and a hex tag."""
    tag = hashlib.sha1(f"{seed}/{split}/{index}".encode()).hexdigest()[:16]
    return f"{273271 + index},{tag}"


def _generate_crowdhuman(root: Path, seed: int, opts: SyntheticOptions) -> _SplitResult:
    """Crowded streets of strangers (no identities) with ignore regions: far-away huddles too
    small to annotate, posters and shop windows with mannequins."""
    splits, strangers = {}, []
    sizes = (("train", opts.train_images), ("val", opts.test_images))
    for stream, (split, count) in enumerate(sizes, start=4):
        rng = np.random.default_rng([seed, stream])
        frames = []
        for index, n in enumerate(person_counts(rng, count, opts.min_persons, opts.max_persons)):
            people = [random_identity(rng) for _ in range(int(n))]
            strangers += people
            name = _crowdhuman_name(seed, split, index)
            frames.append((stream, _Frame(name, -1, [(p, UNLABELED) for p in people])))

        def render(stream: int, index: int, frame: _Frame) -> tuple[RenderedScene, np.ndarray]:
            return _render_crowd(_frame_rng(seed, stream, index), frame, opts)

        with tempfile.TemporaryDirectory() as folder:
            pixels = _pixel_buffer(folder, count, opts)
            rendered = _render_all(frames, render, pixels, f"crowdhuman {split}", opts.progress)
            write_crowdhuman(root, [record for record, _ in rendered], split)
        splits[split] = _summarize(rendered, 0, 0)
    return splits, {"train": [], "test": [], "unlabeled": strangers}


def _render_crowd(
    rng: np.random.Generator, frame: _Frame, opts: SyntheticOptions
) -> tuple[RenderedScene, np.ndarray]:
    """A crowded street whose posters and shop windows, and sometimes a far-away huddle of
    tiny persons, are ignore regions."""
    setting = _random_setting(rng, opts, color_strength=0.6)
    ignore = [setting.backdrop.figure_boxes]
    if rng.random() < 0.5:
        size = opts.min_person * float(rng.uniform(0.3, 0.5))
        ignore.append(paint_distant_crowd(rng, setting.backdrop, setting.view, size)[None])
    scene = _render_persons(rng, frame, setting, opts)
    return scene, np.concatenate(ignore).astype(np.float32)
