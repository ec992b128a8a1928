"""Atomic writes for every artifact flareseg produces, and the removal of what killed writers left behind.

A file is written under a temporary name beside its target, `.<name>.tmp-<pid>-<random><format suffix>`, and
renamed over the target only when complete: a reader sees the old file or the new one, never half of one. A writer
killed with SIGKILL cannot clean up, so its temporary stays; the next run in that folder calls
`remove_stale_temporaries`, which removes exactly the temporaries whose writing process no longer exists.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(\.[A-Za-z0-9.]+)?$")


def format_suffix(name: str) -> str:
    """The suffix a library chooses the file format by: ".nii.gz" for "a.nii.gz", ".png" for "a.png"."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[-7:]
    return Path(name).suffix


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name for writing `path`, in the same folder (so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{format_suffix(path.name)}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary path)`, then rename the result to `path` (removed if `write` fails)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether a file name is one of `temporary_path`'s."""
    return _TEMPORARY.match(Path(path).name) is not None


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporaries (files, or folders written whole) in `folder` whose writing process has died; returns
    what was removed.

    A temporary of a live process (a concurrent writer, or this process) is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*")
    removed = []
    for path in candidates:
        match = _TEMPORARY.match(path.name)
        if match is None or not (path.is_file() or path.is_dir()) or process_alive(int(match["pid"])):
            continue
        try:
            if path.is_dir():  # a folder written whole, then renamed (an int8 model)
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:  # removed meanwhile by another cleaner
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (this process counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that has exited but was not yet reaped by its parent (Linux; False where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")  # the state follows the command name in parentheses
