"""Atomic file writes, and the versioned JSON format shared by profiles, plans and run reports."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from asyncdiff_partition.core.errors import AsyncDiffError

__all__ = ["FileFormatError", "atomic_path", "read_json", "write_atomic", "write_json_atomic"]


class FileFormatError(AsyncDiffError, ValueError):
    """A saved file is missing, corrupt, truncated, of another kind or of an unknown version."""


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temp file in the same folder and a rename.

    A crash or a full disk leaves the old file (or none), never half a file. The folder is
    created if missing; the file gets the usual permissions (0666 less the umask). Every file
    this library writes goes through here.

    Example::

        write_atomic("out/fidelity.md", markdown)
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # name the file asked for, not the temp file beside it
        raise OSError(f"cannot write {str(path)!r} ({error.strerror}); choose another path") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file reads like any other
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"cannot write {str(path)!r} ({error.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside ``path`` to write to (by a writer that takes a path, ``torch.save``); renamed
    to ``path`` when the block ends without an error, removed otherwise. The folder is created.

    Example::

        with atomic_path("run/segment0.pt") as tmp:
            torch.save(obj, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON (stable key order, one key per line) with :func:`write_atomic`."""
    return write_atomic(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike[str], *, kind: str, schema_version: int | tuple[int, ...],
              fix: str) -> dict[str, Any]:
    """Read a file written by :func:`write_json_atomic` and check its kind and version.

    Args:
        path: the file.
        kind: the expected value of the file's ``kind`` field ("profile", "plan", ...).
        schema_version: the version this code reads (or a tuple of the versions it reads).
        fix: what the user should do when the file is unusable (e.g. the command that remakes it).

    Raises:
        FileFormatError: with the problem and ``fix`` in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{kind} file {str(path)!r} does not exist; {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{kind} file {str(path)!r} is corrupt or truncated ({error}); {fix}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise FileFormatError(f"{str(path)!r} is not a {kind} file (kind: {found!r}); {fix}")
    version = data.get("schema_version")
    readable = schema_version if isinstance(schema_version, tuple) else (schema_version,)
    if version not in readable or isinstance(version, bool):
        raise FileFormatError(
            f"{kind} file {str(path)!r} has schema_version {version!r}; this version of "
            f"asyncdiff-partition reads {' or '.join(map(str, readable))}; {fix}"
        )
    return data
