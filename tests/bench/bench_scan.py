"""Benchmark: `trustmilter scan` over the corpus test split, authentication checks on, against a
local test DNS server (a sink that answers NXDOMAIN at once, as ../shared/peers/dns_sink.sh does
for the peers). Prints messages per second (wall), per core (CPU seconds of every trustmilter
process), and per-message latency p50/p99 from the pipeline's own timing.

    .venv/bin/python tests/bench/bench_scan.py [--workers N] [--limit N] [--repeat N]
    .venv/bin/python tests/bench/bench_scan.py --in-process [--limit N] [--repeat N]
        [--split test|train|all] [--dump FILE] [--compare FILE]

--in-process leaves out process start-up and each worker's engine build: it builds one engine in
this process (the DNS sink runs in a child process so its CPU is not counted) and reports the
CPU per message of envelope inference + ``evaluate`` alone (all threads, after 5 warm-up
messages), the figure to hold against a per-message budget. --dump writes each message's verdict (action,
score, symbols with scores and reasons, Authentication-Results) as JSON lines; --compare reads
such a file and fails (exit 1) on the first messages whose verdict differs: a speed change must
leave every verdict as it was.

Run on demand; not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402
from dnsserver import TestDNSServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(workers: int, limit: int | None, repeat: int, extra_config: str) -> dict[str, object]:
    corpus.fetch()
    rows = corpus.messages("test")
    if limit:
        rows = rows[:limit]
    results: list[dict[str, object]] = []
    with TestDNSServer() as dns, tempfile.TemporaryDirectory() as tmp:
        dns.default_behaviour = None  # every name: NXDOMAIN at once
        listing = Path(tmp) / "msgs"
        listing.mkdir()
        for i, (path, label) in enumerate(rows):
            (listing / f"{i:05d}-{label}-{path.name}").symlink_to(path)
        config = Path(tmp) / "bench.yaml"
        config.write_text(f"authserv_id: mx.bench.example\ndns:\n  server: \"{dns.address}\"\n"
                          f"scan:\n  workers: {workers}\n{extra_config}")
        cmd = [str(Path(sys.executable).parent / "trustmilter"), "scan", "--json",
               "--config", str(config), str(listing)]
        for run_no in range(repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            reports = [json.loads(line) for line in proc.stdout.splitlines()]
            assert len(reports) == len(rows), (len(reports), len(rows))
            latencies = [float(r["elapsed_ms"]) for r in reports]
            actions: dict[str, int] = {}
            for r in reports:
                actions[str(r["action"])] = actions.get(str(r["action"]), 0) + 1
            results.append({
                "run": run_no + 1, "messages": len(rows), "wall_s": round(wall, 2),
                "msgs_per_s": round(len(rows) / wall, 1), "cpu_s": round(cpu, 2),
                "msgs_per_cpu_s": round(len(rows) / cpu, 1),
                "cpu_ms_per_msg": round(1000 * cpu / len(rows), 2),
                "latency_ms_p50": round(statistics.median(latencies), 2),
                "latency_ms_p99": round(percentile(latencies, 0.99), 2),
                "actions": actions, "dns_queries": len(dns.queries),
            })
            dns.queries.clear()
    return {"command": " ".join(["python", "tests/bench/bench_scan.py", f"--workers {workers}"]
                                + ([f"--limit {limit}"] if limit else [])),
            "cores": os.cpu_count(), "runs": results}


_HOURS = re.compile(r"\b\d+ h\b")


def split_rows(split: str) -> list[tuple[Path, str]]:
    if split == "all":
        return corpus.messages("train") + corpus.messages("test")
    return corpus.messages(split)


def verdict_line(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """What must not change when only speed changes (elapsed time left out, and the hours a
    2002 Date lies before now in the date rules' reasons)."""
    symbols = [dict(s, reason=_HOURS.sub("N h", s["reason"])) for s in report["symbols"]]
    return {"file": f"{path.parent.name}/{path.name}", "action": report["action"],
            "score": report["score"], "symbols": symbols,
            "authentication_results": report["authentication_results"],
            "reason": report["reason"]}


def compare(dump: list[dict[str, Any]], path: Path) -> list[str]:
    before = {d["file"]: d for d in map(json.loads, path.read_text().splitlines())}
    diffs = []
    for now in dump:
        old = before.get(now["file"])
        if old is not None and old != now:
            diffs.append(f"{now['file']}:\n  before {json.dumps(old)}\n  now    {json.dumps(now)}")
    missing = set(before) - {d["file"] for d in dump}
    if missing and len(dump) == len(before):
        diffs.append(f"{len(missing)} messages of {path} not scanned")
    return diffs


def run_in_process(limit: int | None, repeat: int, split: str = "test",
                   dump: Path | None = None, against: Path | None = None,
                   extra_config: str = "") -> dict[str, object]:
    import multiprocessing

    import yaml

    from trustmilter.config import load_config
    from trustmilter.pipeline import Engine
    from trustmilter.scan import EnvelopeOptions, scan_one

    corpus.fetch()
    rows = split_rows(split)
    if limit:
        rows = rows[:limit]
    raws = [path.read_bytes() for path, _label in rows]
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    sink = ctx.Process(target=_dns_sink, args=(ready, stop), daemon=True)
    sink.start()
    results: list[dict[str, object]] = []
    try:
        address = ready.get(timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.process_time()
            overrides: dict[str, Any] = {"authserv_id": "mx.bench.example",
                                         "dns": {"server": address}, "state": {"dir": tmp}}
            for key, value in (yaml.safe_load(extra_config) or {}).items():
                if isinstance(value, dict):
                    overrides[key] = {**overrides.get(key, {}), **value}
                else:
                    overrides[key] = value
            engine = Engine.from_config(load_config(None, overrides))
            build_cpu = time.process_time() - t0
            given = EnvelopeOptions()
            for raw in raws[:5]:   # warm-up: first SQLite pages, lazily built state
                scan_one("warm-up", raw, given, engine)
            lines: list[dict[str, Any]] = []
            for run_no in range(repeat):
                c0, w0 = time.process_time(), time.perf_counter()
                for (path, _label), raw in zip(rows, raws):
                    report = scan_one("bench", raw, given, engine)
                    if run_no == 0 and (dump or against):
                        lines.append(verdict_line(path, report))
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                results.append({"run": run_no + 1, "messages": len(raws),
                                "cpu_ms_per_msg": round(1000 * cpu / len(raws), 2),
                                "wall_ms_per_msg": round(1000 * wall / len(raws), 2),
                                "msgs_per_cpu_s": round(len(raws) / cpu, 1)})
    finally:
        stop.set()
        sink.join(10)
    if dump is not None:
        dump.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    differences = compare(lines, against) if against is not None else []
    return {"command": " ".join(["python", "tests/bench/bench_scan.py", "--in-process",
                                 f"--split {split}"] + ([f"--limit {limit}"] if limit else [])),
            "engine_build_cpu_s": round(build_cpu, 2), "runs": results,
            "verdicts_differing": len(differences), "differences": differences[:20]}


def _dns_sink(ready: Any, stop: Any) -> None:
    with TestDNSServer() as dns:
        dns.default_behaviour = None  # every name: NXDOMAIN at once
        ready.put(dns.address)
        stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--extra-config", default="", help="YAML appended to the bench config")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU per message of evaluate alone, in this process")
    parser.add_argument("--split", choices=("test", "train", "all"), default="test",
                        help="--in-process: which part of the corpus (default: test)")
    parser.add_argument("--dump", type=Path, help="--in-process: write the verdicts here")
    parser.add_argument("--compare", type=Path,
                        help="--in-process: fail when a verdict differs from this dump")
    args = parser.parse_args()
    if args.in_process:
        res = run_in_process(args.limit, args.repeat, args.split, args.dump, args.compare,
                             args.extra_config)
        print(json.dumps(res, indent=2))
        best_run = min(res["runs"], key=lambda r: r["cpu_ms_per_msg"])  # type: ignore[index]
        print(f"\nevaluate in one process: {best_run['messages']} messages, "
              f"{best_run['cpu_ms_per_msg']} ms CPU/msg ({best_run['msgs_per_cpu_s']} msgs per "
              f"CPU-second); engine build {res['engine_build_cpu_s']} s CPU, not counted")
        if args.compare is not None:
            print(f"verdicts differing from {args.compare}: {res['verdicts_differing']}")
            return 1 if res["verdicts_differing"] else 0
        return 0
    out = run(args.workers, args.limit, args.repeat, args.extra_config)
    print(json.dumps(out, indent=2))
    best = max(out["runs"], key=lambda r: r["msgs_per_s"])  # type: ignore[index]
    print(f"\nscan: {best['messages']} messages, {best['msgs_per_s']} msgs/s wall on "
          f"{out['cores']} cores, {best['msgs_per_cpu_s']} msgs per CPU-second "
          f"({best['cpu_ms_per_msg']} ms CPU/msg), latency p50 {best['latency_ms_p50']} ms, "
          f"p99 {best['latency_ms_p99']} ms")
    print("peers (../shared/peers/README.md, same split): rspamd ~4 ms CPU/msg (~250 msgs per "
          "CPU-second), SpamAssassin ~89 ms CPU/msg (~11 msgs per CPU-second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
