"""The server folders the service may read images from: the allowed roots.

Bulk jobs index files under them, and the file endpoint serves a gallery image from the path it
was indexed from only when that path lies under them: nothing else on the server's disk can be
listed, read or served through the API. Paths are compared after resolving ``..`` and symlinks
(a symlink in an allowed folder may point anywhere).
"""

import os
from collections.abc import Iterable
from pathlib import Path

from server.errors import InvalidField, PathNotAllowed


class AllowedRoots:
    """The allowed roots, symlinks resolved."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = tuple(os.path.realpath(root) for root in roots)

    def locate(self, path: str) -> str | None:
        """The real path of ``path`` when it lies inside an allowed root, else None."""
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):  # a NUL byte, a loop of symlinks
            return None
        return real if self._contains(real) else None

    def resolve(self, path: str, described: str) -> str:
        """The real path of ``path``; raises :class:`PathNotAllowed` (403) naming ``described``
        unless it lies inside an allowed root."""
        if not self.roots:
            raise PathNotAllowed(
                f"{described}: this service reads no server files (no allowed_roots are configured)"
            )
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError) as error:
            raise InvalidField(f"{described}: {error}") from None
        if not self._contains(real):
            raise PathNotAllowed(f"{described} is outside the allowed roots ({self.describe()})")
        return real

    def _contains(self, real: str) -> bool:
        return any(os.path.commonpath([real, root]) == root for root in self.roots)

    def describe(self) -> str:
        """The roots, for messages."""
        return ", ".join(self.roots) if self.roots else "none are configured"
