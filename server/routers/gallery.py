"""``/v1/gallery``: add, read and remove gallery images; gallery counts."""

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Path
from fastapi.responses import Response

from server.dependencies import (
    GalleryServiceDep,
    SearchServiceDep,
    api_key_scheme,
    require_multipart,
)
from server.schemas import (
    AddImagesForm,
    AddImagesResponse,
    GalleryStatsOut,
    ImageOut,
    RemovedImage,
    error_responses,
)
from server.uploads import read_upload

router = APIRouter(
    prefix="/v1/gallery",
    tags=["gallery"],
    dependencies=[Depends(api_key_scheme)],
    responses=error_responses(401, 403, 409, 503),
)

# Image ids are SQLite row ids: no image has a larger one, and SQLite cannot even compare one.
MAX_IMAGE_ID = 2**63 - 1
ImageId = Annotated[int, Path(ge=1, le=MAX_IMAGE_ID, description="Id of a gallery image.")]


@router.post(
    "/images",
    dependencies=[Depends(require_multipart)],
    responses=error_responses(400, 413, 415, 422),
)
async def add_images(
    form: Annotated[AddImagesForm, Form(media_type="multipart/form-data")],
    service: SearchServiceDep,
) -> AddImagesResponse:
    """Detect the persons in the uploaded images and add them to the gallery, all in one
    transaction. Images already in the gallery (same bytes) are reported with `added: false`."""
    uploads = [await read_upload(image) for image in form.images]
    return await service.add_images(uploads, form.cameras, form.timestamps)


@router.get("/images/{image_id}", responses=error_responses(404, 422))
def get_image(image_id: ImageId, service: GalleryServiceDep) -> ImageOut:
    """A gallery image's metadata and its persons."""
    return service.get_image(image_id)


@router.delete("/images/{image_id}", responses=error_responses(404, 422))
def remove_image(image_id: ImageId, service: GalleryServiceDep) -> RemovedImage:
    """Remove a gallery image and its persons."""
    return service.remove_image(image_id)


@router.get(
    "/images/{image_id}/file",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "The image file."},
        **error_responses(404, 422),
    },
)
def get_image_file(image_id: ImageId, service: GalleryServiceDep) -> Response:
    """The image file as it was uploaded (or indexed from an allowed server folder)."""
    file = service.image_file(image_id)
    return Response(file.content, media_type=file.media_type)


@router.get("/stats")
def stats(service: GalleryServiceDep) -> GalleryStatsOut:
    """Counts and settings of the gallery."""
    return service.stats()
