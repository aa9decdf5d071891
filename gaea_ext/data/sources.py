"""Read-only views of a dataset root -- a directory or a tar archive -- by relative POSIX path.

Layout detection and readers only use ``dirs``, ``files``, ``read`` and ``describe``, so every
layout (pickled batches, ImageFolder trees) works the same from a directory or an archive.

Archives are streamed once into memory (only the members ``keep`` accepts; names of all
members are indexed) and never extracted to disk: decoding 60k JPEGs straight from the
archive bytes is much faster than writing 60k small files first. Very large archives
(full ImageNet) should be extracted by the user and passed as a directory instead.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Optional

from .errors import DataError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _visible(name: str) -> bool:
    return not name.startswith(".")


def join(*parts: str) -> str:
    """POSIX join that ignores empty parts (the root is the empty path)."""
    return "/".join(p for p in parts if p)


class DirSource:
    """A directory on disk."""

    archive = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def _scan(self, rel: str, want_dirs: bool) -> list[str]:
        try:
            with os.scandir(self.root / rel) as it:
                return sorted(e.name for e in it if _visible(e.name) and (e.is_dir() if want_dirs else e.is_file()))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise DataError(f"cannot list {self.describe(rel)}: {e}") from e

    def dirs(self, rel: str) -> list[str]:
        """Sorted names of the visible subdirectories of ``rel`` (empty if it is not a directory)."""
        return self._scan(rel, True)

    def files(self, rel: str) -> list[str]:
        """Sorted names of the visible regular files in ``rel``."""
        return self._scan(rel, False)

    def isdir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def isfile(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def read(self, rel: str) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {self.describe(rel)}: {e}") from e

    def describe(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def stamp(self, rels: list[str]) -> str:
        """Digest of the absolute paths, sizes and mtimes of ``rels``: a cache key that changes
        whenever any of those files is replaced, edited, added or removed."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for rel in rels:
            try:
                st = (self.root / rel).stat()
            except OSError as e:
                raise DataError(f"cannot stat {self.describe(rel)}: {e}") from e
            h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()


class ArchiveSource:
    """A tar archive (optionally gzip/bzip2/xz compressed), read lazily on first access."""

    archive = True

    def __init__(self, path: Path, keep: Callable[[str], bool]) -> None:
        self.path = path
        self._keep = keep
        st = path.stat()
        self.identity = (str(path.resolve()), st.st_size, st.st_mtime_ns)  # the cache key
        self._data: Optional[dict[str, bytes]] = None
        self._dirs: dict[str, set[str]] = {}
        self._files: dict[str, set[str]] = {}

    def _index(self) -> None:
        if self._data is not None:
            return
        data: dict[str, bytes] = {}
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for member in tar:
                    name = posixpath.normpath(member.name.lstrip("/"))
                    parts = name.split("/")
                    if name == "." or ".." in parts or not all(_visible(p) for p in parts):
                        continue
                    for i in range(len(parts) - 1):
                        self._dirs.setdefault(join(*parts[:i]), set()).add(parts[i])
                    if member.isdir():
                        self._dirs.setdefault(join(*parts[:-1]), set()).add(parts[-1])
                    elif member.isfile():
                        self._files.setdefault(join(*parts[:-1]), set()).add(parts[-1])
                        if self._keep(name):
                            data[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"cannot read archive {self.path}: {e}") from e
        self._data = data

    def dirs(self, rel: str) -> list[str]:
        self._index()
        return sorted(self._dirs.get(rel, ()))

    def files(self, rel: str) -> list[str]:
        self._index()
        return sorted(self._files.get(rel, ()))

    def isdir(self, rel: str) -> bool:
        self._index()
        head, tail = posixpath.split(rel)
        return rel == "" or tail in self._dirs.get(head, ())

    def isfile(self, rel: str) -> bool:
        self._index()
        head, tail = posixpath.split(rel)
        return tail in self._files.get(head, ())

    def read(self, rel: str) -> bytes:
        self._index()
        if rel not in self._data:
            raise DataError(f"cannot read {self.describe(rel)}: not a kept regular file in the archive")
        return self._data[rel]

    def describe(self, rel: str = "") -> str:
        return f"{self.path}:{rel}" if rel else str(self.path)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def open_root(root: Path, keep: Callable[[str], bool], what: str):
    """A DirSource or ArchiveSource for ``root``; DataError (prefixed ``what: ``) if it is neither."""
    if root.is_dir():
        return DirSource(root)
    if is_archive(root):
        return ArchiveSource(root, keep)
    if root.exists():
        raise DataError(f"{what}: root {root} is neither a directory nor a tar archive ({', '.join(ARCHIVE_SUFFIXES)})")
    raise DataError(f"{what}: root {root} does not exist")
