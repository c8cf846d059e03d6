"""Worker processes start together: the first one to open a missing Bayes database seeds it
from the promoted model while the others wait, and every one of them gets a usable store."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

from trustmilter.config import load_config


def _open(path: str, queue: "multiprocessing.Queue[tuple[str, int]]") -> None:
    from trustmilter.content.registry import open_bayes_store
    config = load_config(None, {"state": {"dir": str(Path(path).parent)}})
    try:
        store = open_bayes_store({**config.section("bayes"), "path": path},
                                 config.section("model"))
        queue.put(("ok", store.token_count()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put((f"{type(exc).__name__}: {exc}", 0))


def test_concurrent_first_open_seeds_once_and_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[tuple[str, int]] = ctx.Queue()
    path = str(tmp_path / "bayes.sqlite")
    procs = [ctx.Process(target=_open, args=(path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [r[0] for r in results] == ["ok"] * 3, results
    counts = {r[1] for r in results}
    assert len(counts) == 1 and counts.pop() > 1000, results   # the shipped export, once
