"""``/v1/gallery/jobs``: bulk-index server folders and manifests; follow the jobs."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from server.dependencies import JobServiceDep, api_key_scheme
from server.schemas import (
    JobListOut,
    JobOut,
    JobRequest,
    described_error,
    error_responses,
)

MAX_JOB_ID = 2**63 - 1  # SQLite row ids
JobId = Annotated[int, Path(ge=1, le=MAX_JOB_ID, description="Id of a job.")]


router = APIRouter(
    prefix="/v1/gallery/jobs",
    tags=["jobs"],
    dependencies=[Depends(api_key_scheme)],
    responses={
        **error_responses(401, 409, 503),
        **described_error(403, "The API key is not valid, or a path is outside the allowed roots."),
    },
)


@router.post(
    "",
    status_code=202,
    responses={
        202: {
            "description": "Queued; `Location` is the job's address.",
            "headers": {"Location": {"description": "The job.", "schema": {"type": "string"}}},
        },
        **error_responses(400),
        **described_error(
            409, "The gallery was built with another model, or a job has this name already."
        ),
        **described_error(
            422,
            "A field is invalid, a path does not exist, a manifest cannot be read, or "
            "there are no images (the message says which).",
        ),
    },
)
def submit_job(
    body: JobRequest, service: JobServiceDep, request: Request, response: Response
) -> JobOut:
    """Index image files on the server: files, folders (`recursive` for their subfolders) and a
    manifest, all under the configured allowed roots (symlinks are followed, and must stay
    inside too, also while the job runs). The job runs in the background, one job at a time;
    follow it at `Location`. Jobs survive restarts: an unfinished job resumes, skipping the
    images it has done. A file that is not a regular file (a FIFO, a device) or is larger than
    the service's `max_image_bytes` fails alone, unread."""
    job = service.submit(body)
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    return job


@router.get("")
def list_jobs(service: JobServiceDep) -> JobListOut:
    """Every job, newest first."""
    return service.all_jobs()


@router.get("/{job_id}", responses=described_error(404, "No job of this id."))
def get_job(job_id: JobId, service: JobServiceDep) -> JobOut:
    """A job's status and progress, with the first images it could not add and why."""
    return service.get(job_id)


@router.post(
    "/{job_id}/cancel",
    responses={
        **described_error(404, "No job of this id."),
        **described_error(409, "The job has finished (done or failed): nothing to cancel."),
    },
)
def cancel_job(job_id: JobId, service: JobServiceDep) -> JobOut:
    """Cancel a queued or running job: it is `cancelled` and never resumed. A running job stops
    after its current image or batch and keeps the images it added; the answer comes once it
    has stopped. Cancelling a cancelled job changes nothing."""
    return service.cancel(job_id)
