"""CPU and memory of process trees, from /proc: what the load test reports for the milter (its
main process, forkserver, resource tracker and workers) and for Postfix (master and everything
it started).

RSS counts a shared page once per process that maps it (what ``ps`` shows; summed over forked
workers it overstates); PSS divides each shared page between the processes that map it, so the
sum of PSS over a tree is what the tree costs the machine.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields follow the last ")".
    return text[text.rindex(")") + 2:].split()


def tree(root: int) -> list[int]:
    """``root`` (if alive) and all its descendants."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parent[int(entry)] = int(fields[1])
    if root not in parent:
        return []
    kids: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        kids.setdefault(ppid, []).append(pid)
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop(0)
        out.append(pid)
        frontier += sorted(kids.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids``, with what their reaped children used (cutime, cstime):
    an smtpd or a worker that exited during the run still counts, through its parent."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(v) for v in fields[11:15])
    return total / HZ


def tree_cpu(root: int) -> float:
    return cpu_seconds(tree(root))


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup; None when the process is gone."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        return None
    if rss is None or pss is None:
        return None
    return rss, pss


def role(pid: int, root: int) -> str:
    """A short name for a milter process: main, forkserver, resource-tracker, worker (a child of
    the forkserver: forked, so its command line is the forkserver's) or child."""
    if pid == root:
        return "main"
    fields = _stat_fields(pid)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return "gone"
    if fields is not None and int(fields[1]) != root:
        return "worker"
    if "forkserver" in cmd:
        return "forkserver"
    if "resource_tracker" in cmd:
        return "resource-tracker"
    return "child"


def snapshot(root: int) -> list[dict[str, object]]:
    """Every process of the tree: pid, role, RSS and PSS (KiB), threads (a thread pool that
    grew holds more per-thread state: stacks, SQLite connections)."""
    out: list[dict[str, object]] = []
    for pid in tree(root):
        mem = memory_kb(pid)
        fields = _stat_fields(pid)
        if mem is not None and fields is not None:
            out.append({"pid": pid, "role": role(pid, root), "rss_kb": mem[0], "pss_kb": mem[1],
                        "threads": int(fields[17])})
    return out


class MemorySampler(threading.Thread):
    """Sums RSS and PSS over a process tree every ``interval`` seconds and keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.root = root
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self.samples = 0
        self._pids: list[int] = []
        self._tree_at = 0.0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        # The tree is found again once a second (or when a process went away), not at every
        # sample: walking all of /proc with 100 smtpd processes costs more than the sample.
        now = time.monotonic()
        if now - self._tree_at > 1.0:
            self._pids, self._tree_at = tree(self.root), now
        rss = pss = n = 0
        for pid in self._pids:
            mem = memory_kb(pid)
            if mem is None:
                self._tree_at = 0.0
                continue
            rss, pss, n = rss + mem[0], pss + mem[1], n + 1
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_processes = max(self.peak_processes, n)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            self.sample()
            self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
