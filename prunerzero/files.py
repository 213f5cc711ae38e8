"""Writing files so that nothing a user made is lost: atomic replacement, regular files only.

Every file is written under a temporary name unique to its writer (``tempfile.mkstemp`` in the
target's folder) and moved into place with ``os.replace``: a crash mid-write leaves the previous
version intact, and two writers never share a temporary file. An existing target is replaced only
if it is a regular file (never a symlink, a device or a folder).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from prunerzero.errors import UserError


def check_output_path(path: str | Path, protected: tuple[Path, ...] = ()) -> Path:
    """The path an output may be written to, or a one-line error: not a folder, a symlink or a
    device, and none of the ``protected`` files (a run's own checkpoint, config, log...)."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"output {path} is a symbolic link; prunerzero does not write through links, give a file path")
    if path.exists():
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"output {path} is a directory; give a file name inside it, e.g. {path / 'out.json'}")
        if not stat.S_ISREG(mode):
            raise UserError(f"output {path} is not a regular file (a device or a pipe); give a file path")
    resolved = path.resolve()
    for p in protected:
        if Path(p).resolve() == resolved:
            raise UserError(f"output {path} is one of the run's own files; write the export elsewhere "
                            f"(e.g. {path.with_name('export.json')})")
    return path


def write_atomic(path: str | Path, text: str, protected: tuple[Path, ...] = ()) -> None:
    path = check_output_path(path, protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any, protected: tuple[Path, ...] = ()) -> None:
    # allow_nan=False: every JSON prunerzero writes is strict JSON
    write_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n", protected)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Strict JSON (NaN and Infinity refused), with one-line errors."""
    path = Path(path)

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not strict JSON")

    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; it was not written by prunerzero") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be a prunerzero file") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{what} {path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
