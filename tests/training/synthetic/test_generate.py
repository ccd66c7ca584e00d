"""Generated datasets, read back through the real loaders."""

import importlib
import itertools
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from training.datasets import load_dataset
from training.synthetic import generate, generator_fingerprint, make_options
from training.synthetic.__main__ import main
from training.synthetic.identity import MIN_IDENTITY_DISTANCE, identity_distance

# Small images, persons 20-60 px (3x), a few identities: each dataset takes a second or two.
TINY = dict(
    width=192, height=128, min_person=20, max_person=60, train_identities=6, test_identities=4,
    train_images=16, test_images=12, cameras=3, progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    return generate("prw", tmp_path_factory.mktemp("prw"), seed=1, **TINY)


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    return generate("cuhk_sysu", tmp_path_factory.mktemp("cuhk"), seed=2, **TINY)


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    crowded = {**TINY, "train_images": 8, "test_images": 6}
    return generate("crowdhuman", tmp_path_factory.mktemp("crowd"), seed=3, **crowded)


def _all_boxes(split) -> np.ndarray:
    return np.concatenate([image.boxes for image in split.images])


def _all_pids(split) -> np.ndarray:
    return np.concatenate([image.pids for image in split.images])


def test_prw_loads_with_queries_for_every_test_identity(prw):
    train = load_dataset("prw", prw.root, "train")
    test = load_dataset("prw", prw.root, "test")
    assert len(train.images) == 16 and len(test.images) == 12
    assert train.num_identities == 6 and test.num_identities == 4
    assert sorted(query.pid for query in test.queries) == [0, 1, 2, 3]
    by_name = test.by_name()
    for query in test.queries:
        image = by_name[query.image]
        assert any(np.allclose(box, query.box) for box in image.boxes[image.pids == query.pid])
        assert query.camera == image.camera


def test_prw_identities_are_seen_by_at_least_two_cameras(prw):
    for split in ("train", "test"):
        loaded = load_dataset("prw", prw.root, split)
        cameras: dict[int, set[int]] = {}
        for image in loaded.images:
            for pid in image.pids[image.pids >= 0].tolist():
                cameras.setdefault(pid, set()).add(image.camera)
        assert len(cameras) == loaded.num_identities
        assert all(len(seen) >= 2 for seen in cameras.values()), cameras


def test_prw_frame_names_follow_the_camera_sequence_pattern(prw):
    names = [image.name for image in load_dataset("prw", prw.root, "train").images]
    for name in names:
        camera, rest = name[1:].split("s", 1)
        sequence, frame = rest.split("_")
        assert 1 <= int(camera) <= 3 and int(sequence) >= 1 and len(frame) == 6


def test_prw_train_and_test_identities_are_disjoint_on_disk(prw):
    # Raw PRW ids: ID_train.mat lists the training identities, query_info.txt the test ones.
    train_ids = set(scipy.io.loadmat(prw.root / "ID_train.mat")["ID_train"].ravel().tolist())
    lines = (prw.root / "query_info.txt").read_text().split()
    test_ids = {float(value) for value in lines[0::6]}
    assert len(train_ids) == 6 and len(test_ids) == 4
    assert not train_ids & test_ids


def test_cuhk_sysu_loads_with_galleries_and_positives(cuhk):
    train = load_dataset("cuhk_sysu", cuhk.root, "train")
    test = load_dataset("cuhk_sysu", cuhk.root, "test", gallery_size=50)
    assert len(train.images) == 16 and len(test.images) == 12
    assert train.num_identities == 6 and test.num_identities == 4
    assert len(test.queries) == 4
    for query in test.queries:
        positives = [item for item in query.gallery if item.target is not None]
        assert positives, "every query has its identity somewhere in its gallery"
        assert query.image not in {item.image for item in query.gallery}
        assert len(query.gallery) == 11  # the pool (12) minus the query's own image


def test_cuhk_sysu_scene_names_interleave_train_and_test(cuhk):
    test = {image.name for image in load_dataset("cuhk_sysu", cuhk.root, "test").images}
    train = {image.name for image in load_dataset("cuhk_sysu", cuhk.root, "train").images}
    assert train | test == {f"s{k}" for k in range(1, 29)}
    assert not train & test


def test_crowdhuman_loads_crowded_scenes_with_ignore_regions(crowd):
    for split in ("train", "val"):
        loaded = load_dataset("crowdhuman", crowd.root, split)
        counts = [len(image.boxes) for image in loaded.images]
        assert min(counts) >= 6  # the CrowdHuman default of 6 to 16 persons per image
        assert sum(len(image.ignore_boxes) for image in loaded.images) > 0
        assert (_all_pids(loaded) == -1).all()


def _overlapping_pairs(split) -> int:
    pairs = 0
    for image in split.images:
        for a, b in itertools.combinations(image.boxes, 2):
            w = min(a[2], b[2]) - max(a[0], b[0])
            h = min(a[3], b[3]) - max(a[1], b[1])
            pairs += w > 0 and h > 0
    return pairs


@pytest.mark.parametrize(("name", "fixture"), [("prw", "prw"), ("cuhk_sysu", "cuhk")])
def test_person_search_splits_have_occlusion_unlabeled_persons_and_3x_scale(name, fixture, request):
    summary = request.getfixturevalue(fixture)
    for split in ("train", "test"):
        loaded = load_dataset(name, summary.root, split)
        heights = _all_boxes(loaded)[:, 3] - _all_boxes(loaded)[:, 1]
        assert heights.max() / heights.min() >= 2.5  # persons 20 to 60 px asked: 3x
        assert (_all_pids(loaded) == -1).any()
        assert _overlapping_pairs(loaded) > 0
        assert summary.splits[split].occluded > 0  # persons with < 90% of their pixels visible


def test_crowded_scenes_overlap_more_than_person_search_scenes(crowd, prw):
    crowded = load_dataset("crowdhuman", crowd.root, "train")
    sparse = load_dataset("prw", prw.root, "train")
    assert _overlapping_pairs(crowded) / len(crowded.images) > _overlapping_pairs(sparse) / len(
        sparse.images
    )


@pytest.mark.parametrize("fixture", ["prw", "cuhk"])
def test_identity_tables_share_shirts_and_keep_train_and_test_apart(fixture, request):
    summary = request.getfixturevalue(fixture)
    train, test = summary.identities["train"], summary.identities["test"]
    assert len(train) == 6 and len(test) == 4
    for table in (train, test, train + test):
        colours = Counter(identity.upper_color for identity in table)
        shared = sum(colours[identity.upper_color] > 1 for identity in table)
        assert shared >= len(table) / 5
    for a, b in itertools.product(train, test):
        assert identity_distance(a, b) >= MIN_IDENTITY_DISTANCE


def test_summary_counts_match_the_files(prw):
    test = load_dataset("prw", prw.root, "test")
    summary = prw.splits["test"]
    assert summary.images == len(test.images)
    assert summary.persons == len(_all_pids(test))
    assert summary.labeled == int((_all_pids(test) >= 0).sum())
    assert summary.queries == len(test.queries) == 4
    assert "prw" in str(prw) and "test" in str(prw)


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes; a .mat file's first 116 bytes are its text header, which scipy
    stamps with the creation time, so they are left out."""
    return {
        str(path.relative_to(root)): path.read_bytes()[116:]
        if path.suffix == ".mat"
        else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("format", ["prw", "cuhk_sysu", "crowdhuman"])
def test_the_same_seed_writes_the_same_bytes(format, tmp_path):
    small = {
        **TINY,
        "train_images": 4,
        "test_images": 3,
        "train_identities": 3,
        "test_identities": 2,
    }
    generate(format, tmp_path / "a", seed=5, **small)
    generate(format, tmp_path / "b", seed=5, **small)
    generate(format, tmp_path / "c", seed=6, **small)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c


def test_unknown_or_invalid_options_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic options"):
        make_options("prw", identities=3)
    with pytest.raises(ValueError, match="person heights"):
        make_options("prw", min_person=80, max_person=40)
    with pytest.raises(ValueError, match="unknown synthetic format"):
        generate("market1501", tmp_path)


def test_too_many_identities_for_the_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="identities"):
        generate("cuhk_sysu", tmp_path, **{**TINY, "test_identities": 40, "test_images": 3})


def test_command_line_writes_a_dataset_and_prints_the_summary(tmp_path, capsys):
    args = ["--format", "crowdhuman", "--out", str(tmp_path), "--seed", "4", "--no-progress"]
    args += ["--train-images", "3", "--test-images", "2", "--width", "160", "--height", "120"]
    args += ["--min-person", "20", "--max-person", "60"]
    assert main(args) == 0
    assert "val" in capsys.readouterr().out
    assert len(load_dataset("crowdhuman", tmp_path, "val").images) == 2


def test_command_line_reports_bad_options(tmp_path, capsys):
    args = ["--format", "prw", "--out", str(tmp_path), "--min-person", "90", "--max-person", "30"]
    assert main(args) == 2
    assert "person heights" in capsys.readouterr().err


def test_the_generator_fingerprint_follows_its_source_code(tmp_path, monkeypatch):
    fingerprint = generator_fingerprint()
    assert fingerprint == generator_fingerprint() and len(fingerprint) == 12
    # The same package with one source file changed: another fingerprint.
    # The module, not the function the package exports under the same name.
    generate_module = importlib.import_module("training.synthetic.generate")
    package = Path(generate_module.__file__).parent
    copy = tmp_path / "synthetic"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "render.py").write_text((copy / "render.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(generate_module, "__file__", str(copy / "generate.py"))
    assert generator_fingerprint() != fingerprint
