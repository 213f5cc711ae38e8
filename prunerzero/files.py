"""Writing files so that nothing a user made is lost.

**The output rule** (every command that writes a file or a folder the user names):
- never onto a file a run folder keeps (its checkpoint, config, log, hall of fame, records), the
  command's own run or another's; a run folder is recognised by its checkpoint (``state.json``);
- never through a symbolic link, never onto a directory, a device or a pipe;
- never into an existing, non-empty model folder without ``--force`` (and never into a run folder);
- every output path is checked before the expensive work starts.

Every file is written under a temporary name unique to its writer (``tempfile.mkstemp`` in the
target's folder) and moved into place with ``os.replace``: a crash mid-write leaves the previous
version intact, and two writers never share a temporary file. The file gets the mode ``open``
would have given it (an existing file keeps its mode; a new one follows the umask). An
``OSError`` (a full disk, no permission) becomes one line naming the path, and no temporary file
is left behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from prunerzero.errors import UserError, write_error  # noqa: F401 (write_error: for the commands)

RUN_CHECKPOINT = "state.json"  # what makes a folder a run folder
# The files the engine keeps in a run folder. A command writes only its own among them (``own``).
RUN_FILES = (RUN_CHECKPOINT, "config.yaml", "log.jsonl", "hall_of_fame.json", "fitness.png", "pareto.png",
             "search.lock", "environment.json", "heldout.json", "allocation.json", "allocation.png",
             "sweep.json", "sweep.png", "report.html", "export.json", "pareto.json")
# What a folder may hold and still be a new run's folder: a start that failed before its first checkpoint.
RUN_START_FILES = ("config.yaml", "environment.json", "search.lock")
# Statistics a start computes before its first checkpoint (X, G: pruning/stats.py and fitness/model_fitness.py;
# the inverse-Hessian factors: fitness/obs_fitness.py), named PREFIX<key>.safetensors; a new start reuses them.
RUN_STATS_PREFIXES = ("activations-", "gradients-", "obs-factors-")


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / RUN_CHECKPOINT).is_file()


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder that holds ``path`` (or is it), else None."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if is_run_folder(folder):
            return folder
    return None


def _check_folders_above(path: Path, what: str) -> None:
    """The nearest existing folder above ``path`` must be a folder (not a file) we can create in."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.is_symlink() and not parent.exists():
            raise UserError(f"{what} {path}: {parent} is a broken symbolic link; give another path")
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a folder; give a path inside a folder")
            return


def check_output_path(path: str | Path, what: str = "output", own: Iterable[str] = (), own_run: str | Path | None = None,
                      protected: tuple[Path, ...] = ()) -> Path:
    """The file an output may be written to, or a one-line error (the output rule above).

    ``own``: the names of files this command writes into its own run folder ``own_run`` (``report.html``
    for ``report RUN``); ``protected``: more files to refuse."""
    path = Path(path)
    if str(path) in ("", "."):
        raise UserError(f"{what} path is empty; give a file name")
    if path.is_symlink():
        raise UserError(f"{what} {path} is a symbolic link; prunerzero does not write through links, give a file path")
    if path.exists():
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{what} {path} is a directory; give a file name inside it, e.g. {path / 'out.json'}")
        if not stat.S_ISREG(mode):
            raise UserError(f"{what} {path} is not a regular file (a device or a pipe); give a file path")
    _check_folders_above(path, what)
    run = run_folder_of(path.parent) if path.parent.exists() else None
    if run is not None:
        inside = path.absolute().parent == run
        mine = own_run is not None and inside and run == Path(own_run).absolute() and path.name in set(own)
        if not mine and (path.exists() or (inside and path.name in RUN_FILES)):
            raise UserError(f"{what} {path} is one of the run's own files (run {run}); prunerzero never writes "
                            f"over a run's files, write elsewhere (e.g. {Path.cwd() / ('out' + (path.suffix or '.json'))})")
    resolved = path.resolve()
    for p in protected:
        if Path(p).resolve() == resolved:
            raise UserError(f"{what} {path} is one of the run's own files; write elsewhere "
                            f"(e.g. {path.with_name('export.json')})")
    return path


def check_distinct(paths: dict[str, str | Path | None]) -> None:
    """Two outputs of one command must not be one file."""
    seen: dict[Path, str] = {}
    for flag, p in paths.items():
        if p is None:
            continue
        key = Path(p).absolute()
        if key in seen:
            raise UserError(f"{seen[key]} and {flag} name the same file {p}; give each its own")
        seen[key] = flag


def check_model_folder(path: str | Path, what: str = "--save-model", force: bool = False) -> Path:
    """A folder a model may be saved into: new, or empty, or (with ``force``) an existing model's folder;
    never a file, a link, a run folder or a folder inside one."""
    path = Path(path)
    if str(path) in ("", "."):
        raise UserError(f"{what} needs a folder name")
    if path.is_symlink():
        raise UserError(f"{what} {path} is a symbolic link; give a folder path")
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; give a new folder name")
    _check_folders_above(path, what)
    if run_folder_of(path) is not None or (path.is_dir() and any(p.is_dir() and is_run_folder(p) for p in path.iterdir())):
        raise UserError(f"{what} {path} is (or holds) a search run's folder; save the model elsewhere")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UserError(f"{what} {path} exists and is not empty; give a new folder, or pass --force to write the model "
                        "files into it (files of the same names are replaced)")
    return path


def _mode_for(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: the existing file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it into place. OS errors
    become one line and remove the temporary file."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"output {path} is a symbolic link, a directory or a device; give a file path")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = _mode_for(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str, protected: tuple[Path, ...] = ()) -> None:
    path = check_output_path(path, protected=protected) if protected else Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_with(path, write)


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


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without aliases (an alias bomb expands a few lines into gigabytes) and without
    duplicate keys (the second would silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise UserError(f"YAML aliases (*{event.anchor}) are not accepted in a config (line "
                            f"{event.start_mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise UserError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """One YAML loader for every user file: safe, no aliases, no duplicate keys, one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply") from None
