"""Read mail from what users point us at: a message file, a directory (recursively; Maildir's
cur/ and new/ included), an mbox. Yields (label, raw bytes)."""
from __future__ import annotations

import mailbox
import os
from pathlib import Path
from typing import Iterator

from trustmilter.errors import MessageSourceError


def _is_mbox(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(5)
    except OSError:
        return False
    if head != b"From ":
        return False
    # A single saved message may also start with "From "; an mbox has its separator lines
    # followed by headers. Treat it as an mbox when a second separator exists or the file
    # name says so.
    if path.suffix in (".mbox", ".mbx") or path.name.lower() in ("mbox", "inbox"):
        return True
    with open(path, "rb") as fh:
        fh.readline()
        for line in fh:
            if line.startswith(b"From ") and b"@" in line or line.startswith(b"From -"):
                return True
    return False


def iter_messages(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise MessageSourceError(f"{item}: no such file or directory")
        if path.is_dir():
            if (path / "cur").is_dir() and (path / "new").is_dir():
                for sub in ("new", "cur"):
                    yield from _files_in(path / sub)
            else:
                yield from _files_in(path)
        elif _is_mbox(path):
            yield from _mbox(path)
        else:
            yield str(path), _read(path)


def _files_in(directory: Path) -> Iterator[tuple[str, bytes]]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if _is_mbox(path):
                yield from _mbox(path)
            else:
                yield str(path), _read(path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MessageSourceError(f"{path}: {exc.strerror}") from None


def _mbox(path: Path) -> Iterator[tuple[str, bytes]]:
    box = mailbox.mbox(str(path), create=False)
    try:
        for i, key in enumerate(box.iterkeys()):
            yield f"{path}#{i + 1}", box.get_bytes(key)
    finally:
        box.close()
