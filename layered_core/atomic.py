"""Writing files so that they are either whole or absent.

The bytes go to a temporary file in the destination's directory, are flushed to disk, and only then
renamed over the destination: a failed or interrupted write leaves the old file (or nothing) and never half
a file. Every file the pack writes goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

# Read once at import: os.umask can only be read by setting it, which would race with other threads later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def new_file_mode() -> int:
    """The permissions a new file gets here: 0o666 less the umask."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to inside the ``with`` block; when the block ends without
    an error the file is synced and renamed to ``path``, otherwise removed, ``path`` left as it was.

    The file gets the permissions any new file would get (the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: the directory {directory} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    os.close(handle)
    try:
        yield Path(temporary)
        fd = os.open(temporary, os.O_RDWR)
        try:
            os.fchmod(fd, new_file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is; not every platform can open a directory.
    with contextlib.suppress(OSError):
        directory_handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_handle)
        finally:
            os.close(directory_handle)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it to ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        write(file)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8 into ``path``, whole or not at all."""
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))
