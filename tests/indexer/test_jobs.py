"""Ingest jobs recorded in the gallery: inputs, outcomes, progress counts, resumption."""

import pytest

from indexer.jobs import ItemOutcome, JobItem, JobNotFound, JobStore
from indexer.sources import ImageSource
from indexer.store import Gallery

A, B, C = (ImageSource(f"/images/{name}.jpg", "gate", 10.0 * i) for i, name in enumerate("abc"))


@pytest.fixture
def jobs(gallery):
    with JobStore(gallery) as store:
        yield store


def test_a_new_job_lists_its_inputs_as_pending(jobs):
    job = jobs.create([A, B], name="nightly")
    assert (job.name, job.status, job.done, job.total) == ("nightly", "queued", 0, 2)
    assert jobs.items(job.id) == [JobItem(0, A, "pending"), JobItem(1, B, "pending")]
    assert jobs.find("nightly") == job
    assert jobs.find("weekly") is None


def test_job_names_are_unique(jobs):
    jobs.create([A], name="nightly")
    with pytest.raises(ValueError, match="a job named 'nightly' exists already"):
        jobs.create([B], name="nightly")
    unnamed = jobs.create([B])  # any number of unnamed jobs
    assert unnamed.name is None and jobs.create([C]).id != unnamed.id


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "1 to 256 characters"), ("n" * 257, "1 to 256 characters"), ("n\ud800", "U\\+D800")],
)
def test_a_job_name_is_short_printable_text(jobs, name, message):
    """An unpaired surrogate cannot even be looked up in SQLite (it is no UTF-8)."""
    with pytest.raises(ValueError, match=f"a job name .*{message}"):
        jobs.create([A], name=name)
    assert jobs.all_jobs() == []


def test_extend_appends_only_new_paths(jobs):
    job = jobs.create([A, B])
    assert jobs.extend(job.id, [B, C, C]) == 1
    assert [item.source for item in jobs.items(job.id)] == [A, B, C]
    assert jobs.get(job.id).total == 3


def test_recorded_outcomes_count_as_done_once(jobs):
    job = jobs.create([A, B, C])
    jobs.start(job.id)
    jobs.record(job.id, [ItemOutcome(0, "added", 100, 5, image_id=7)])
    jobs.record(job.id, [ItemOutcome(1, "failed", error="truncated")])
    # Item 0 again (its file changed and was read again): still one done item, not two.
    jobs.record(job.id, [ItemOutcome(0, "duplicate", 120, 6, image_id=7)])
    assert jobs.get(job.id).done == 2
    assert jobs.items(job.id)[:2] == [
        JobItem(0, A, "duplicate", 120, 6, 7),
        JobItem(1, B, "failed", error="truncated"),
    ]


def test_counts_and_failures_report_a_job_without_listing_its_items(jobs):
    d = ImageSource("/images/d.jpg")
    job = jobs.create([A, B, C, d])
    jobs.start(job.id)
    jobs.record(
        job.id,
        [
            ItemOutcome(2, "failed", error="not an image"),
            ItemOutcome(0, "added", 1, 1, 1),
            ItemOutcome(1, "failed", error="truncated"),
        ],
    )
    # Item 0 added, items 1 and 2 failed, item 3 not attempted; no duplicate (still a key).
    assert jobs.counts(job.id) == {"pending": 1, "added": 1, "duplicate": 0, "failed": 2}
    # Failures come in job order (item 1 before item 2), whatever order they were recorded in.
    both = [
        JobItem(1, B, "failed", error="truncated"),
        JobItem(2, C, "failed", error="not an image"),
    ]
    assert jobs.failures(job.id, limit=5) == both
    assert jobs.failures(job.id, limit=1) == both[:1]
    assert jobs.failures(job.id, limit=0) == []


def test_counts_and_failures_refuse_unknown_jobs_and_negative_limits(jobs):
    job = jobs.create([A])
    with pytest.raises(JobNotFound, match="no job with id 99"):
        jobs.counts(99)
    with pytest.raises(JobNotFound, match="no job with id 99"):
        jobs.failures(99, limit=1)
    # SQLite reads LIMIT -1 as "no limit": refused rather than answered with every failure.
    with pytest.raises(ValueError, match="limit must be at least 0, got -1"):
        jobs.failures(job.id, limit=-1)


def test_starting_again_retries_failed_items(jobs):
    job = jobs.create([A, B, C])
    jobs.start(job.id)
    jobs.record(job.id, [ItemOutcome(0, "added", 1, 1, 1), ItemOutcome(1, "failed", error="x")])
    jobs.finish(job.id, "cancelled", "interrupted")
    restarted = jobs.start(job.id)
    # Only item 0 stays done; item 1 is pending again, with item 2.
    assert (restarted.status, restarted.done, restarted.error) == ("running", 1, None)
    assert [item.status for item in jobs.items(job.id)] == ["added", "pending", "pending"]


def test_jobs_survive_reopening_the_gallery(gallery, gallery_path):
    with JobStore(gallery) as store:
        job = store.create([A, B], name="nightly")
        store.start(job.id)
        store.record(job.id, [ItemOutcome(0, "added", 1, 2, 3)])
    gallery.close()
    with Gallery.open(gallery_path, None) as reopened, JobStore(reopened) as store:
        found = store.find("nightly")
        assert (found.id, found.status, found.done, found.total) == (job.id, "running", 1, 2)
        assert [job.id for job in store.all_jobs()] == [job.id]


def test_bad_statuses_and_unknown_jobs_are_refused(jobs):
    job = jobs.create([A])
    with pytest.raises(ValueError, match="job status must be one of"):
        jobs.finish(job.id, "finished")
    with pytest.raises(ValueError, match="an outcome is one of"):
        jobs.record(job.id, [ItemOutcome(0, "pending")])
    with pytest.raises(JobNotFound, match="no job with id 99"):
        jobs.get(99)
    with pytest.raises(JobNotFound, match="no job with id 99"):
        jobs.start(99)
