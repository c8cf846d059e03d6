"""CPU and memory of a set of processes (a daemon and its children), read from /proc, for the
benchmarks that compare trustmilter with other filters: the same accounting for every engine.

- ``tree_cpu(roots)``: CPU seconds (user + system) of the roots and all their descendants, plus
  what their reaped children used (cutime/cstime), so a worker that exited mid-run still counts.
- ``Sampler``: a thread that sums RSS and PSS (/proc/PID/smaps_rollup) over the same process
  tree several times a second and keeps the peaks. PSS splits shared pages between the
  processes that map them, so the sum is what the tree really costs; RSS counts shared pages
  once per process (an upper bound, and what `ps` shows).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own CPU ticks, reaped children's CPU ticks) of ``pid``, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _all_stats() -> dict[int, tuple[int, int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def descendants(roots: Iterable[int], stats: dict[int, tuple[int, int, int]] | None = None
                ) -> set[int]:
    """The roots that exist and every process below them."""
    stats = _all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, (ppid, _own, _reaped) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    frontier = [r for r in roots if r in stats]
    while frontier:
        pid = frontier.pop()
        if pid not in found:
            found.add(pid)
            frontier.extend(children.get(pid, ()))
    return found


def tree_cpu(roots: Iterable[int]) -> float:
    stats = _all_stats()
    return sum(stats[p][1] + stats[p][2] for p in descendants(roots, stats)) / HZ


def memory_kb(pids: Iterable[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in kB; processes that vanished meanwhile count 0."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            key, _sep, value = line.partition(":")
            if key == "Rss":
                rss += int(value.split()[0])
            elif key == "Pss":
                pss += int(value.split()[0])
    return rss, pss


class Sampler(threading.Thread):
    """Samples the memory of the trees under ``roots()`` every ``interval`` seconds until
    stopped; ``roots`` is called each time, so it may name processes that start later."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.max_processes = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids = descendants(self.roots())
        if not pids:
            return
        rss, pss = memory_kb(pids)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.max_processes = max(self.max_processes, len(pids))
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            self.sample()
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> "Sampler":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(10)

    def result(self) -> dict[str, float]:
        return {"peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
                "peak_pss_mb": round(self.peak_pss_kb / 1024, 1),
                "processes": self.max_processes, "samples": self.samples}
