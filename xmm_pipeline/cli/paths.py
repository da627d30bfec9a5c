"""Output paths checked before a command does its work, so that an unwritable one is one line, not a
traceback after minutes of work.

The checks write a probe file instead of trusting permission bits: root ignores them, while an
immutable folder (chattr +i), a read-only mount, /proc or a path below a regular file refuse writes
to everyone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from xmm_pipeline.errors import UserError


def _probe(folder: Path) -> None:
    """Write and remove a file in `folder`, creating the folder for the test and removing what was created."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=".xmm-write-test.", dir=folder)
        os.close(fd)
        os.unlink(name)
    finally:
        for created in missing:
            created.rmdir()


def writable_folder(path: str | os.PathLike[str], option: str) -> Path:
    """Prove a file can be written in the output folder (created if needed by the work itself)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: not a folder")
    try:
        _probe(folder)
    except OSError as error:
        raise UserError(f"{option} {folder}: cannot write there ({error.strerror})") from None
    return folder


def writable_file(path: str | os.PathLike[str], option: str) -> Path:
    """Prove the output file can be written (a file written beside it, an existing file opened for
    writing) without touching an existing file's contents."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {target}: is a folder, not a file")
    try:
        _probe(target.parent)
        if target.exists():
            with open(target, "ab"):
                pass
    except OSError as error:
        raise UserError(f"{option} {target}: cannot write there ({error.strerror})") from None
    return target
