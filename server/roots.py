"""The server folders the service may read images from: the allowed roots.

Bulk jobs index files under them, and the file endpoint serves a gallery image from the path it
was indexed from only when that path lies under them: nothing else on the server's disk can be
listed, read or served through the API. Paths are compared after resolving ``..`` and symlinks
(a symlink in an allowed folder may point anywhere), and files are then read without following
any link (``common.reading``): a link swapped in after the check cannot lead out either.
"""

from collections.abc import Iterable
from pathlib import Path

from common.reading import FileRefused, lies_within, real_path
from server.errors import InvalidField, PathNotAllowed


class AllowedRoots:
    """The allowed roots, symlinks resolved (``roots``: what ``common.reading`` reads
    ``within``)."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = tuple(real_path(root) for root in roots)

    def locate(self, path: str) -> str | None:
        """The real path of ``path`` when it lies inside an allowed root, else None."""
        try:
            real = real_path(path)
        except FileRefused:  # a NUL byte, a loop of symlinks
            return None
        return real if lies_within(real, self.roots) else None

    def resolve(self, path: str, described: str) -> str:
        """The real path of ``path``; raises :class:`PathNotAllowed` (403) naming ``described``
        unless it lies inside an allowed root."""
        if not self.roots:
            raise PathNotAllowed(
                f"{described}: this service reads no server files (no allowed_roots are configured)"
            )
        try:
            real = real_path(path)
        except FileRefused as error:
            raise InvalidField(f"{described}: {error}") from None
        if not lies_within(real, self.roots):
            raise PathNotAllowed(f"{described} is outside the allowed roots ({self.describe()})")
        return real

    def describe(self) -> str:
        """The roots, for messages."""
        return ", ".join(self.roots) if self.roots else "none are configured"
