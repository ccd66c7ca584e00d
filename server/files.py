"""The bytes of uploaded gallery images, kept by content hash so that they can be served back.

The gallery stores what was detected, not the pixels. Uploads are written here as
``<root>/<sha256[:2]>/<sha256>`` (two-level, so that no folder grows to millions of entries),
durably and atomically (``common.files``): a crash leaves either the whole file or none. The
same bytes are stored once.
"""

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.files import write_bytes_atomically

_MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png"}


class ImageFiles:
    """Image files by SHA-256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        """Where the file with this hash is (or would be) kept."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def save(self, sha256: str, data: bytes) -> Path:
        """Keep ``data`` (whose hash the caller computed) unless already kept."""
        target = self.path(sha256)
        if not target.exists():
            write_bytes_atomically(target, data)
        return target

    def find(self, sha256: str) -> Path | None:
        """The kept file with this hash, or None."""
        target = self.path(sha256)
        return target if target.is_file() else None

    def remove(self, sha256: str) -> None:
        """Forget the file with this hash (nothing if none)."""
        self.path(sha256).unlink(missing_ok=True)


def media_type(path: Path) -> str:
    """The media type of an image file, from its header (``image/<format>``)."""
    try:
        with Image.open(path) as image:
            image_format = image.format or ""
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"
    return _MEDIA_TYPES.get(image_format, f"image/{image_format.lower()}")
