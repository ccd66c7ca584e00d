"""The synthetic dataset cache: one folder per (format, seed, options, generator), only complete
datasets under their names."""

import pytest

from training.synthetic import cache
from training.synthetic.cache import COMPLETE_MARKER, cached_dataset, dataset_folder

TINY_CROWDHUMAN = {"train_images": 2, "test_images": 1, "min_persons": 2, "max_persons": 3}


def test_a_generated_dataset_is_reused_and_other_options_get_another_folder(tmp_path):
    root, generated = cached_dataset(tmp_path, "crowdhuman", 0, progress=False, **TINY_CROWDHUMAN)
    assert generated is not None and (root / COMPLETE_MARKER).is_file()
    assert str(generated.root) != str(root)  # written elsewhere, renamed when complete

    again = cached_dataset(tmp_path, "crowdhuman", 0, progress=False, **TINY_CROWDHUMAN)
    assert again == (root, None)

    other_seed, _ = cached_dataset(tmp_path, "crowdhuman", 1, progress=False, **TINY_CROWDHUMAN)
    more_images = {**TINY_CROWDHUMAN, "train_images": 3}
    other_options, _ = cached_dataset(tmp_path, "crowdhuman", 0, progress=False, **more_images)
    assert len({root, other_seed, other_options}) == 3
    # Only finished datasets are left behind, no temporary folders.
    assert sorted(tmp_path.iterdir()) == sorted([root, other_seed, other_options])


def test_how_progress_is_shown_is_not_part_of_the_name(tmp_path):
    options = cache.dataset_options("crowdhuman", **TINY_CROWDHUMAN)
    assert "progress" not in options
    assert cache.dataset_options("crowdhuman", progress=False, **TINY_CROWDHUMAN) == options


def test_a_changed_generator_gets_another_folder(tmp_path, monkeypatch):
    options = cache.dataset_options("crowdhuman", **TINY_CROWDHUMAN)
    before = dataset_folder(tmp_path, "crowdhuman", 0, options)
    monkeypatch.setattr(cache, "generator_fingerprint", lambda: "0123456789ab")
    assert dataset_folder(tmp_path, "crowdhuman", 0, options) != before


def test_an_unfinished_dataset_folder_is_generated_again(tmp_path):
    options = cache.dataset_options("crowdhuman", **TINY_CROWDHUMAN)
    root = dataset_folder(tmp_path, "crowdhuman", 0, options)
    (root / "leftover").mkdir(parents=True)  # an interrupted write: no completion marker

    found, generated = cached_dataset(tmp_path, "crowdhuman", 0, progress=False, **TINY_CROWDHUMAN)
    assert found == root and generated is not None
    assert not (root / "leftover").exists()


@pytest.mark.parametrize(
    ("format", "options", "message"),
    [("market1501", {}, "unknown synthetic format 'market1501'"),
     ("prw", {"frames": 3}, "unknown synthetic options \\['frames'\\]")],
)  # fmt: skip
def test_a_format_or_option_the_generator_lacks_is_refused(tmp_path, format, options, message):
    with pytest.raises(ValueError, match=message):
        cached_dataset(tmp_path, format, 0, **options)
    assert not list(tmp_path.iterdir())
