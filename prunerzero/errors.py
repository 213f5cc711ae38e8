"""The one exception type for problems a user can fix, and the one line an operating-system error
becomes when prunerzero writes a file."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """Bad input: a config, a tree, a path, a flag. The CLI prints it as one line and exits with
    ``status`` (2; 1 when the machine, not the input, is at fault: a full disk).

    The message names the problem and, where there is one, the way out.
    """

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def write_error(path: str | Path | None, error: OSError) -> UserError:
    """An ``OSError`` raised while writing ``path``, as one line naming the path and the way out."""
    where = str(path if path is not None else (error.filename or "the output"))
    code = error.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return UserError(f"no space left on the device holding {where}; free some space or write elsewhere "
                         "(nothing was replaced)", status=1)
    if code in (errno.EACCES, errno.EPERM):
        return UserError(f"permission denied writing {where}; choose a folder you may write to")
    if code == errno.EROFS:
        return UserError(f"{where} is on a read-only file system; write elsewhere")
    if code == errno.EISDIR:
        return UserError(f"{where} is a directory; give a file path inside it")
    if code == errno.ENOTDIR:
        return UserError(f"a part of {where} is a file, not a folder; give a path whose folders are folders")
    if code == errno.EEXIST:
        return UserError(f"{where} already exists; give another path")
    if code == errno.ENAMETOOLONG:
        return UserError(f"the name {where} is too long for the file system; give a shorter one")
    return UserError(f"cannot write {where}: {error.strerror or error}")


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
