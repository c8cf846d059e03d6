"""Side by side, in one run on this machine: trustmilter against rspamd 3.4 and SpamAssassin 4.0.1
as set up by ../shared/peers, on the corpus test split (1208 messages), with the same tools for
every engine.

    .venv/bin/python tests/bench/side_by_side.py [--out DIR] [--quick | --limit N] [--repeat 3]
        [--conc 2] [--no-train]

Needs root, Debian 12 and the peers' packages (installed with ../shared/peers/install.sh when one
is missing). Takes about 8 minutes (--quick: about 3). What it runs, in this order, one thing at a
time on the otherwise idle daemons:

1. ../shared/peers/stop_all.sh (a clean slate), make_split.py (the fixed split:
   test iff int(md5(file_name).hexdigest(), 16) % 5 == 0), dns_sink.sh (dnsmasq on 127.0.0.1:53,
   NXDOMAIN for every name): the one resolver of every engine, trustmilter included.
2. trustmilter scan --json over the test split (default workers: one per core), its Bayes seeded
   by a one-message scan first so the seeding is not timed; its `score` into the peers' CSV
   format (path,label,score,latency_s,error) for ../shared/peers/metrics.py; with --train (the
   default), `trustmilter train` on the training split into a temporary directory, timed.
3. SpamAssassin: sa_setup.sh, sa_train.sh, sa_spamd.sh start, scan.py --engine spamc --conc 2.
4. rspamd: rspamd_setup.sh config/start, rspamd_train.sh, scan.py --engine rspamd-http --conc 2.
5. Postfix (postfix_setup.sh: 127.0.0.1:2525 -> discard), the test split sent by
   smtp_send.py --conc 8 (persistent connections) after a 16-message warm-up per engine, with
   smtpd_milters = rspamd's unix socket and trustmilter's (`trustmilter serve --socket
   unix:/tmp/peers/tm/tm.sock`) in 3 alternating rounds of one pass each (R T, T R, R T: the
   VM's speed drifts over minutes, and one engine after the other would credit the drift to
   whichever ran in the faster minutes; --one-after-the-other sends all of rspamd's passes,
   then all of trustmilter's, with rspamd stopped), then none (the ceiling).
6. stop_all.sh and the milter stopped, also on failure or Ctrl-C.

For each: msgs/s (wall), per core (msgs per CPU-second of the filter's own processes: rspamd's
and its redis, spamd and its children, the milter and its workers, the scan CLI and its workers;
and wall msgs/s / cores), latency p50/p99 (scan.py's and smtp_send.py's client-side times; for
trustmilter scan the pipeline's own elapsed_ms), peak resident memory (summed RSS and PSS of the
same processes, sampled 5 times a second), accuracy at default thresholds (metrics.py: AUC,
FPR, FNR, spam recall at FPR <= 0.1 % and <= 1 %). Prints a table and the ratios, writes
side_by_side.json (every figure, command, version) and side_by_side.png into --out (default:
/tmp/trustmilter-bench/side-by-side-TIMESTAMP).

trustmilter is configured to evaluate every message fully: smtp_send.py connects from
127.0.0.1, which trustmilter would skip as a trusted network, so trusted_networks is empty and
127.0.0.0/8 is a trusted relay (the client and HELO of SPF, iprev and DNSBLs come from the first
Received hop outside it, as scan infers them); the log is checked for action=skip (the milter
figures are marked void otherwise). Its state (reputation, history, Bayes seeded from the shipped
model) starts empty on every run; within the run the 3 passes feed reputation, as rspamd's are
free of state (the peers turn its greylisting off).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402
from procstats import Sampler, tree_cpu  # noqa: E402

SHARED = Path(os.environ.get("TRUSTMILTER_SHARED", ROOT.parent / "shared"))
PEERS = SHARED / "peers"
W = Path("/tmp/peers")                       # the peers' scratch directory (their scripts fix it)
TM_DIR = W / "tm"
TM_SOCK = TM_DIR / "tm.sock"
TM_LOG = TM_DIR / "trustmilter.log"
RSPAMD_SOCK = W / "rspamd" / "run" / "milter.sock"
PEERS_MILTER = "inet:127.0.0.1:11332"        # what postfix_setup.sh and run_all.sh leave in main.cf
PEERS_PY = W / "venv" / "bin" / "python"     # metrics.py needs the peers' scikit-learn venv
SYS_PY = "/usr/bin/python3"                  # run_all.sh runs scan.py and smtp_send.py with it
TRUSTMILTER = Path(sys.executable).parent / "trustmilter"
PACKAGES = ("spamassassin", "spamc", "spamd", "rspamd", "redis-server", "postfix",
            "dnsmasq-base", "time", "bc", "tcpdump")
SA_THRESHOLD, RSPAMD_THRESHOLD = 5.0, 6.0    # the peers' default thresholds
WARMUP = 16
CORES = os.cpu_count() or 1


class Interrupted(Exception):
    pass


def _on_term(_signum: int, _frame: Any) -> None:
    raise Interrupted("SIGTERM")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as metrics.py computes it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


class Bench:
    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out = out
        self.args = args
        self.commands: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.milter: subprocess.Popen[bytes] | None = None
        self.tm_command: list[str] = []
        self.postfix_touched = False
        self.junk = self._tm_junk_threshold()

    # ----- helpers ------------------------------------------------------------------------------
    def run(self, cmd: list[str], env: dict[str, str] | None = None, check: bool = True,
            stdin: str | None = None, name: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command, keep its output in OUT/logs/NAME.log and the command in the record."""
        started = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, input=stdin, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        name = name or Path(cmd[0]).name
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"{name}.log", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n")
        self.commands.append({"cmd": " ".join(cmd), "env": env or {}, "rc": proc.returncode,
                              "wall_s": round(wall, 2)})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
        return proc

    def peer(self, script: str, *args: str, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        path = PEERS / script
        cmd = [SYS_PY, str(path), *args] if script.endswith(".py") else [str(path), *args]
        return self.run(cmd, env=env, check=check, name=f"{Path(script).stem}")

    @staticmethod
    def _tm_junk_threshold() -> float:
        import yaml
        defaults = yaml.safe_load((ROOT / "milter/trustmilter/data/defaults.yaml").read_text())
        return float(defaults["actions"]["junk"])

    def metrics(self, csv_path: Path, threshold: float) -> dict[str, Any]:
        proc = self.run([str(PEERS_PY), str(PEERS / "metrics.py"), "--threshold", str(threshold),
                         str(csv_path)], name="metrics")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def dns_queries(self) -> int:
        try:
            with open(W / "logs" / "dnsmasq.log", "rb") as f:
                return sum(1 for line in f if b": query[" in line)
        except OSError:
            return 0

    # ----- 1. set-up ----------------------------------------------------------------------------
    def prepare(self) -> None:
        data = corpus.fetch()
        missing = [p for p in PACKAGES if subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}", p], capture_output=True,
            text=True).stdout.strip() != "install ok installed"]
        venv_ok = PEERS_PY.exists() and subprocess.run(
            [str(PEERS_PY), "-c", "import sklearn"], capture_output=True).returncode == 0
        if missing or not venv_ok:
            log(f"installing the peers' packages (missing: {missing or 'venv'})")
            self.peer("install.sh")
        log("stop_all.sh: a clean slate")
        self.peer("stop_all.sh", check=False)
        self.peer("make_split.py", env={"CORPUS": str(data)})
        rows = [tuple(line.rsplit(" ", 1)) for line in
                (W / "split" / "test.txt").read_text().splitlines() if line.strip()]
        # The peers' split must be ours (tests/bench/corpus.py), message for message.
        ours = {(str(p.resolve()), label) for p, label in corpus.messages("test")}
        theirs = {(str(Path(p).resolve()), label) for p, label in rows}
        if ours != theirs:
            raise RuntimeError(f"peers' test split differs from corpus.py's ({len(theirs)} vs "
                               f"{len(ours)} messages)")
        if self.args.limit:
            step = max(1, len(rows) // self.args.limit)
            rows = rows[::step][:self.args.limit]   # both classes: the list is ham, then spam
        self.rows: list[tuple[str, str]] = [(p, label) for p, label in rows]
        self.test_list = self.out / "test_list.txt"
        self.test_list.write_text("".join(f"{p} {label}\n" for p, label in self.rows))
        self.warmup_list = self.out / "warmup_list.txt"
        self.warmup_list.write_text("".join(f"{p} {label}\n" for p, label in self.rows[:WARMUP]))
        self.peer("dns_sink.sh", "start")
        shutil.rmtree(TM_DIR, ignore_errors=True)
        TM_DIR.mkdir(parents=True)
        TM_DIR.chmod(0o755)          # Postfix's smtpd (user postfix) reaches the socket through it
        self.scan_config = self._tm_config("scan-state")
        self.milter_config = self._tm_config("state")

    def _tm_config(self, state: str) -> Path:
        """trustmilter as shipped except: the peers' DNS sink, private state, no site rules, the
        shipped model, and every message evaluated in full although it comes from 127.0.0.1."""
        path = TM_DIR / f"{state}.yaml"
        path.write_text(f"""\
authserv_id: mx.bench.example
dns:
  server: "127.0.0.1:53"
# smtp_send.py connects from 127.0.0.1: not a trusted network (that mail would pass unfiltered)
# but a trusted relay, so that SPF, iprev and DNSBLs judge the first Received hop outside it,
# as `scan` infers the client from the same headers.
trusted_networks: []
trusted_relays: ["127.0.0.0/8", "::1/128"]
state:
  dir: {TM_DIR / state}
rules:
  local_dir: {TM_DIR / 'rules.d'}
model:
  dir: {ROOT / 'models'}
milter:
  skip_trusted_networks: false
  socket_owner: postfix
  log_format: json
  log_file: {TM_LOG}
  workers: {self.args.tm_workers}
""")
        return path

    # ----- 2. trustmilter scan ------------------------------------------------------------------
    def tm_scan(self) -> None:
        log(f"trustmilter scan: {len(self.rows)} messages")
        base = [str(TRUSTMILTER), "scan", "--json", "--config", str(self.scan_config)]
        # Seed the Bayes database from the shipped model's export (done once, on first open),
        # untimed: the peers' Bayes is trained before their scan too.
        self.run(base + [self.rows[0][0]], name="tm_scan_seed")
        cmd = base + [p for p, _label in self.rows]
        labels = dict(self.rows)
        dns0, load, busy0 = self.dns_queries(), os.getloadavg()[0], _system_cpu()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        stderr = open(self.out / "logs" / "tm_scan.stderr", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        reports: list[dict[str, Any]] = []
        t_first, cpu_first = 0.0, 0.0
        with Sampler(lambda: [proc.pid]) as sampler:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not reports:
                    # Start-up (imports, engine build in each worker) ends with the first verdict.
                    t_first, cpu_first = time.perf_counter() - t0, tree_cpu([proc.pid])
                reports.append(json.loads(line))
            rc = proc.wait()
        wall = time.perf_counter() - t0
        stderr.close()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1 = _system_cpu()
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.commands.append({"cmd": " ".join(base) + f" <{len(self.rows)} test-split files>",
                              "rc": rc, "wall_s": round(wall, 2)})
        if rc != 0 or len(reports) != len(self.rows):
            raise RuntimeError(f"trustmilter scan: exit {rc}, {len(reports)} reports for "
                               f"{len(self.rows)} messages (see logs/tm_scan.stderr)")
        csv_path = self.out / "tm_scan.csv"
        with open(csv_path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["path", "label", "score", "latency_s", "error"])
            for r in reports:
                out.writerow([r["file"], labels[r["file"]], r["score"],
                              float(r["elapsed_ms"]) / 1000, ""])
        n = len(reports)
        actions: dict[str, int] = {}
        flagged = {"ham": 0, "spam": 0}
        for r in reports:
            actions[r["action"]] = actions.get(r["action"], 0) + 1
            flagged[labels[r["file"]]] += r["action"] != "inbox"
        hams = sum(1 for _p, label in self.rows if label == "ham")
        steady = n - 1
        self.results["tm_scan"] = {
            "engine": "trustmilter", "path": "scan", "messages": n,
            "wall_s": round(wall, 2), "msgs_per_s": round(n / wall, 1),
            "cpu_s": round(cpu, 2), "msgs_per_cpu_s": round(n / cpu, 1),
            "startup": {"first_verdict_s": round(t_first, 2), "cpu_s": round(cpu_first, 2)},
            # The CLI's start-up left out: from the first verdict to the last.
            "steady": {"msgs_per_s": round(steady / (wall - t_first), 1),
                       "msgs_per_cpu_s": round(steady / max(1e-9, cpu - cpu_first), 1)},
            "memory": sampler.result(), "dns_queries": self.dns_queries() - dns0,
            "load_1m_at_start": round(load, 2),
            "system_cpu_busy_pct": round(100 * (1 - (busy1[1] - busy0[1])
                                                / max(1, busy1[0] - busy0[0])), 1),
            "actions": actions,
            "by_action": {"ham_not_inbox": flagged["ham"], "spam_inbox": (n - hams) - flagged["spam"],
                          "fpr_pct": round(100 * flagged["ham"] / max(1, hams), 2),
                          "fnr_pct": round(100 * ((n - hams) - flagged["spam"]) / max(1, n - hams), 2)},
            "metrics": self.metrics(csv_path, self.junk), "threshold": self.junk,
            "command": " ".join(base) + " FILE...",
        }

    def tm_train(self) -> None:
        log("trustmilter train on the training split (timed)")
        with tempfile.TemporaryDirectory(prefix="sbs-train-") as tmp:
            split = Path(tmp) / "split"
            corpus.write_split(split)
            cmd = [str(TRUSTMILTER), "train", "--ham", str(split / "train" / "ham"), "--spam",
                   str(split / "train" / "spam"), "--out", str(Path(tmp) / "model"),
                   "--no-progress", "--config", str(self.scan_config)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = self.run(cmd, name="tm_train")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.results["train"]["trustmilter"] = {
            "wall_s": self.commands[-1]["wall_s"],
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1),
            "messages": len(corpus.messages("train")), "command": " ".join(cmd[:2]) + " ...",
            "note": "model + Bayes from scratch, as the shipped one (without its extra modern "
                    "examples)", "rc": proc.returncode}

    # ----- 3-4. the peers' scans ----------------------------------------------------------------
    def peer_scan(self, key: str, engine: str, roots: list[int], threshold: float,
                  port: int | None = None) -> None:
        log(f"{key}: scan.py --engine {engine} --conc {self.args.conc}")
        prefix = self.out / key
        args = ["--engine", engine, "--list", str(self.test_list), "--conc", str(self.args.conc),
                "--server-pids", ",".join(map(str, roots)), "--out", str(prefix)]
        if port:
            args += ["--port", str(port)]
        dns0, cpu0, load = self.dns_queries(), tree_cpu(roots), os.getloadavg()[0]
        with Sampler(lambda: roots) as sampler:
            self.peer("scan.py", *args)
        cpu = tree_cpu(roots) - cpu0
        summary = json.loads((prefix.with_suffix(".json")).read_text())
        n = summary["messages"]
        self.results[key] = {
            "messages": n, "wall_s": summary["wall_s"], "msgs_per_s": round(n / summary["wall_s"], 1),
            "cpu_s": round(cpu, 2), "msgs_per_cpu_s": round(n / max(cpu, 1e-9), 1),
            "scan_py_server_cpu_s": summary["server_cpu_s"], "errors": summary["errors"],
            "memory": sampler.result(), "dns_queries": self.dns_queries() - dns0,
            "load_1m_at_start": round(load, 2),
            "system_cpu_busy_pct": summary["system_cpu_busy_pct_of_2cores"],
            "metrics": self.metrics(prefix.with_suffix(".csv"), threshold), "threshold": threshold,
            "command": f"scan.py {' '.join(args)}",
        }

    def spamassassin(self) -> None:
        out_env = {"OUT_DIR": str(self.out / "peers")}
        log("SpamAssassin: sa_setup.sh")
        self.peer("sa_setup.sh")
        if self.args.quick and self.sa_trained():
            # A trial only: the Bayes database on disk already holds the training split.
            log("SpamAssassin: Bayes already trained on the training split, kept (--quick)")
            self.results["train"]["spamassassin"] = {"wall_s": None, "how": "kept (--quick)"}
        else:
            log("SpamAssassin: sa_train.sh (sa-learn on the training split)")
            self.peer("sa_train.sh", env=out_env)
            self.results["train"]["spamassassin"] = _train_seconds(
                self.out / "peers" / "sa_train.txt", "sa-learn train wall:", "sa-learn (1 core)")
            # CPU is steadier than wall on a shared machine: sa_train.sh runs sa-learn under
            # /usr/bin/time -v (the final --sync is not in it).
            self.results["train"]["spamassassin"]["cpu_s"] = round(sum(
                _time_v_cpu(self.out / "peers" / f"sa_train_{c}.time") for c in ("ham", "spam")), 1)
        self.peer("sa_spamd.sh", "start")
        try:
            spamd = int((W / "sa" / "spamd.pid").read_text())
            self.peer_scan("sa_scan", "spamc", [spamd], SA_THRESHOLD, port=7830)
            self.results["sa_scan"].update(engine="SpamAssassin", path="scan")
        finally:
            self.peer("sa_spamd.sh", "stop", check=False)

    def sa_trained(self) -> bool:
        """Whether SpamAssassin's Bayes counts exactly the training split's ham and spam."""
        proc = subprocess.run(["sa-learn", "-L", f"--siteconfigpath={W / 'sa' / 'etc'}",
                               "--dump", "magic"], capture_output=True, text=True)
        counts = {line.split()[-1]: int(line.split()[2]) for line in proc.stdout.splitlines()
                  if line.endswith(("nspam", "nham"))}
        train = [line.rsplit(" ", 1)[1] for line in
                 (W / "split" / "train.txt").read_text().splitlines() if line.strip()]
        return counts == {"nham": train.count("ham"), "nspam": train.count("spam")}

    def rspamd_roots(self) -> list[int]:
        return [int((W / "rspamd" / "run" / "rspamd.pid").read_text()),
                int((W / "rspamd" / "redis.pid").read_text())]

    def rspamd(self) -> None:
        log("rspamd: rspamd_setup.sh config + start, rspamd_train.sh")
        self.peer("rspamd_setup.sh", "config")
        self.peer("rspamd_setup.sh", "start")
        roots = self.rspamd_roots()
        cpu0, before = tree_cpu(roots), resource.getrusage(resource.RUSAGE_CHILDREN)
        self.peer("rspamd_train.sh", env={"OUT_DIR": str(self.out / "peers")})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.results["train"]["rspamd"] = _train_seconds(
            self.out / "peers" / "rspamd_train_default.txt", "total", "rspamc learn -n 2")
        # rspamd's processes and redis, plus the rspamc clients (the script's children)
        self.results["train"]["rspamd"]["cpu_s"] = round(
            tree_cpu(roots) - cpu0 + after.ru_utime - before.ru_utime
            + after.ru_stime - before.ru_stime, 1)
        self.peer_scan("rspamd_scan", "rspamd-http", self.rspamd_roots(), RSPAMD_THRESHOLD)
        self.results["rspamd_scan"].update(engine="rspamd", path="scan")

    # ----- 5. through Postfix -------------------------------------------------------------------
    def postfix_start(self) -> None:
        log("Postfix: postfix_setup.sh config, start")
        self.postfix_touched = True
        self.peer("postfix_setup.sh", "config")
        if self.run(["postfix", "status"], check=False, name="postfix").returncode == 0:
            self.run(["postfix", "reload"], name="postfix")
        else:
            self.run(["postfix", "start"], name="postfix")
        time.sleep(1)

    def set_milter(self, spec: str) -> None:
        self.run(["postconf", "-e", f"smtpd_milters = {spec}"], name="postfix")
        self.run(["postfix", "reload"], name="postfix")
        time.sleep(1)    # as run_all.sh: let the new smtpd processes take over

    def smtp(self, key: str, milter: str, roots: list[int]) -> None:
        log(f"{key}: smtpd_milters = {milter or '(none)'}; smtp_send.py --conc 8 "
            f"--repeat {self.args.repeat}")
        self.set_milter(milter)
        self.warm_up_smtp(key)
        self.log_offset = _log_lines(TM_LOG)
        result = _combined([self.send_measured(self.out / key, roots, self.args.repeat)], milter)
        del result["rounds"]     # one send of --repeat passes: no rounds
        if not milter:
            result["path"] = "Postfix alone"
        if not roots:            # Postfix alone: no filter processes to measure
            for name in ("cpu_s", "msgs_per_cpu_s", "memory"):
                del result[name]
        self.results[key] = result

    def warm_up_smtp(self, key: str) -> None:
        self.peer("smtp_send.py", "--list", str(self.warmup_list), "--conc", "8",
                  "--out", str(self.out / f"warmup_{key}"))

    def send_measured(self, prefix: Path, roots: list[int], repeat: int) -> dict[str, Any]:
        """The test split through Postfix ``repeat`` times, as one part of ``_combined``: counts,
        wall time and latencies (smtp_send.py's summary and CSV), the CPU of the processes
        under ``roots`` and their peak memory, the DNS queries and the load."""
        args = ["--list", str(self.test_list), "--conc", "8", "--repeat", str(repeat),
                "--out", str(prefix)]
        dns0, cpu0, load = self.dns_queries(), tree_cpu(roots), os.getloadavg()[0]
        with Sampler(lambda: roots) as sampler:
            self.peer("smtp_send.py", *args)
        summary = json.loads(prefix.with_suffix(".json").read_text())
        return {"messages": summary["messages"], "wall_s": summary["wall_s"],
                "cpu_s": tree_cpu(roots) - cpu0, "dns_queries": self.dns_queries() - dns0,
                "load_1m_at_start": round(load, 2), "outcomes": summary["outcomes"],
                "memory": sampler.result(),
                "system_cpu_busy_pct": summary["system_cpu_busy_pct_of_2cores"],
                "latencies_s": _csv_latencies(prefix.with_suffix(".csv")),
                "command": f"smtp_send.py {' '.join(args)}"}

    def rspamd_milter(self) -> None:
        self.smtp("rspamd_milter", f"unix:{RSPAMD_SOCK}", self.rspamd_roots())
        self.results["rspamd_milter"]["engine"] = "rspamd"
        self.peer("rspamd_setup.sh", "stop")   # leave trustmilter the machine without it

    def tm_milter(self) -> None:
        self.tm_start()
        self.smtp("tm_milter", f"unix:{TM_SOCK}", [self.milter.pid])
        self._tm_evaluation()

    def _tm_evaluation(self) -> None:
        r = self.results["tm_milter"]
        r["engine"] = "trustmilter"
        r["command_serve"] = " ".join(self.tm_command)
        r["evaluation"] = self.check_tm_log(r["messages"])
        r["valid"] = r["evaluation"]["every_message_evaluated"]

    def milters_interleaved(self) -> None:
        """rspamd's milter and trustmilter's through Postfix in alternating rounds, one pass of
        the test split each per round (--repeat rounds; the order flips every round: R T, T R,
        R T). This machine is a shared VM whose speed drifts by 10-20 % over minutes: measured
        one after the other, whichever engine ran in a faster minute won by that much. Both
        daemons run throughout, the one not measured idle. Each engine's figures add up its
        rounds (messages, wall time, CPU; latency percentiles over all its messages; memory:
        the peak), and the per-round rates and ratios are kept too."""
        self.tm_start()
        engines = {"rspamd_milter": (f"unix:{RSPAMD_SOCK}", self.rspamd_roots),
                   "tm_milter": (f"unix:{TM_SOCK}", lambda: [self.milter.pid])}
        for key, (spec, _roots) in engines.items():
            self.set_milter(spec)
            self.warm_up_smtp(key)
        self.log_offset = _log_lines(TM_LOG)
        rounds: dict[str, list[dict[str, Any]]] = {key: [] for key in engines}
        for number in range(self.args.repeat):
            order = list(engines) if number % 2 == 0 else list(reversed(engines))
            for key in order:
                spec, roots_of = engines[key]
                log(f"round {number + 1}: {key}: smtpd_milters = {spec}; smtp_send.py --conc 8")
                self.set_milter(spec)
                prefix = self.out / f"{key}_round{number + 1}"
                rounds[key].append({"round": number + 1,
                                    **self.send_measured(prefix, roots_of(), 1)})
        for key, parts in rounds.items():
            self.results[key] = _combined(parts, engines[key][0])
            self.results[key]["command"] = ("smtp_send.py --list test_list.txt --conc 8 "
                                            "--repeat 1, per round")
        self.results["rspamd_milter"]["engine"] = "rspamd"
        self.results["interleaved"] = {
            "rounds": self.args.repeat,
            "rate_ratio_per_round": [
                round((t["messages"] / t["wall_s"]) / (r["messages"] / r["wall_s"]), 3)
                for r, t in zip(rounds["rspamd_milter"], rounds["tm_milter"])]}
        self.peer("rspamd_setup.sh", "stop")
        self._tm_evaluation()

    def tm_start(self) -> None:
        log("trustmilter serve")
        TM_LOG.unlink(missing_ok=True)
        cmd = [str(TRUSTMILTER), "serve", "--socket", f"unix:{TM_SOCK}", "--config",
               str(self.milter_config)]
        stderr = open(self.out / "logs" / "tm_serve.stderr", "wb")
        self.milter = subprocess.Popen(cmd, stdout=stderr, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.commands.append({"cmd": " ".join(cmd), "rc": None})
        deadline = time.monotonic() + 300
        while not (TM_LOG.exists() and "listening on" in TM_LOG.read_text(errors="replace")):
            if self.milter.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("trustmilter serve did not start (logs/tm_serve.stderr)")
            time.sleep(0.2)
        self.tm_command = cmd

    def check_tm_log(self, expected: int) -> dict[str, Any]:
        """Every message of the measured run must have been evaluated: no action=skip, no error."""
        deadline = time.monotonic() + 30
        entries: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            entries = _log_entries(TM_LOG)[self.log_offset:]
            if len(entries) >= expected:
                break
            time.sleep(0.2)
        actions: dict[str, int] = {}
        for e in entries:
            actions[e.get("action", "?")] = actions.get(e.get("action", "?"), 0) + 1
        evaluated = sum(c for a, c in actions.items()
                        if a in ("inbox", "junk", "quarantine", "reject", "tempfail"))
        per_pass = len(self.rows)

        def mean_score(part: list[dict[str, Any]]) -> float:
            scores = [float(e["score"]) for e in part if "score" in e]
            return round(sum(scores) / max(1, len(scores)), 3)

        def junked(part: list[dict[str, Any]]) -> int:
            return sum(1 for e in part if e.get("action") not in ("inbox", None))

        eval_ms = [float(e["eval_ms"]) for e in entries if "eval_ms" in e]
        return {"log_lines": len(entries), "actions": actions, "evaluated": evaluated,
                "every_message_evaluated": evaluated == expected == len(entries),
                # Reputation builds up over the passes of the same messages (log order is about
                # send order): how far the scores and actions moved from the first pass.
                "passes": [{"mean_score": mean_score(entries[i:i + per_pass]),
                            "not_inbox": junked(entries[i:i + per_pass])}
                           for i in range(0, len(entries), per_pass)],
                "eval_ms_p50": round(percentile(eval_ms, 0.5), 1),
                "eval_ms_p99": round(percentile(eval_ms, 0.99), 1),
                "held_queue_ids": [e["queue_id"] for e in entries
                                   if e.get("action") == "quarantine"]}

    def stop_milter(self) -> None:
        if self.milter is None or self.milter.poll() is not None:
            return
        log("stopping trustmilter serve")
        self.milter.terminate()
        try:
            self.milter.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.milter.pid, signal.SIGKILL)   # its own session: only its processes
            self.milter.wait(10)

    def postfix_alone(self) -> None:
        self.smtp("postfix_alone", "", [])
        self.results["postfix_alone"]["engine"] = "Postfix alone"

    # ----- 6. clean-up --------------------------------------------------------------------------
    def cleanup(self) -> None:
        try:
            if self.postfix_touched:
                self.set_milter(PEERS_MILTER)     # main.cf as the peers' scripts leave it
        except Exception as exc:  # noqa: BLE001
            log(f"could not restore smtpd_milters: {exc}")
        self.stop_milter()
        if TM_LOG.exists():
            shutil.copy(TM_LOG, self.out / "logs" / "trustmilter.log")
            # Messages trustmilter quarantined went to Postfix's hold queue: delete those only.
            held = [e["queue_id"] for e in _log_entries(TM_LOG)
                    if e.get("action") == "quarantine" and e.get("queue_id", "-") != "-"]
            if held:
                self.run(["postsuper", "-d", "-", "hold"], stdin="\n".join(held) + "\n",
                         check=False, name="postsuper")
        log("stop_all.sh")
        self.peer("stop_all.sh", check=False)


def _smtp_codes(outcomes: dict[str, int]) -> dict[str, int]:
    """smtp_send.py's outcomes ("label:code:...") counted by SMTP reply code."""
    codes: dict[str, int] = {}
    for outcome, count in outcomes.items():
        code = outcome.split(":")[1]
        codes[code] = codes.get(code, 0) + count
    return codes


def _csv_latencies(path: Path) -> list[float]:
    with path.open(newline="") as f:
        return [float(row["latency_s"]) for row in csv.DictReader(f) if row.get("latency_s")]


def _combined(parts: list[dict[str, Any]], spec: str) -> dict[str, Any]:
    """Measured sends (``send_measured``) as one result: an engine's interleaved rounds, or the
    one send of ``smtp``."""
    n = sum(p["messages"] for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    cpu = sum(p["cpu_s"] for p in parts)
    latencies = sorted(x for p in parts for x in p["latencies_s"])
    outcomes: dict[str, int] = {}
    for p in parts:
        for outcome, count in p["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    codes = _smtp_codes(outcomes)
    memory = {k: max(p["memory"][k] for p in parts) for k in parts[0]["memory"]}
    return {
        "path": "milter via Postfix", "messages": n, "wall_s": round(wall, 3),
        "msgs_per_s": round(n / wall, 1),
        "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "system_cpu_busy_pct": round(sum(p["system_cpu_busy_pct"] for p in parts) / len(parts), 1),
        "outcomes": outcomes, "smtp_codes": codes,
        "tempfails": sum(c for code, c in codes.items() if code.startswith("4")),
        "dns_queries": sum(p["dns_queries"] for p in parts),
        "load_1m_at_start": parts[0]["load_1m_at_start"], "smtpd_milters": spec,
        "command": parts[0]["command"], "cpu_s": round(cpu, 2), "msgs_per_cpu_s": round(n / max(cpu, 1e-9), 1),
        "memory": memory,
        "rounds": [{k: v for k, v in p.items() if k not in ("latencies_s", "command")}
                   | {"msgs_per_s": round(p["messages"] / p["wall_s"], 1),
                      "msgs_per_cpu_s": round(p["messages"] / max(p["cpu_s"], 1e-9), 1)}
                   for p in parts]}


def _system_cpu() -> tuple[int, int]:
    """(all, idle) jiffies of the machine, as scan.py and smtp_send.py read them."""
    v = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    return sum(v[:8]), v[3] + v[4]


def _time_v_cpu(path: Path) -> float:
    """User + system seconds from a GNU time -v report."""
    total = 0.0
    for line in (path.read_text().splitlines() if path.exists() else []):
        key, _sep, value = line.strip().partition(": ")
        if key in ("User time (seconds)", "System time (seconds)"):
            total += float(value)
    return total


def _train_seconds(path: Path, marker: str, how: str) -> dict[str, Any]:
    """The training time the peers' script printed (``... total 21.9 s`` / ``wall: 75.2 s``)."""
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        if marker in line:
            after = line.split(marker, 1)[1].split()
            if after:
                try:
                    return {"wall_s": round(float(after[0]), 1), "how": how, "line": line.strip()}
                except ValueError:
                    pass
    return {"wall_s": None, "how": how}


def _log_entries(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        _head, sep, rest = line.partition(" INFO {")
        if sep:
            try:
                out.append(json.loads("{" + rest))
            except ValueError:
                continue
    return out


def _log_lines(path: Path) -> int:
    return len(_log_entries(path))


# ----- report -------------------------------------------------------------------------------------
ROWS = (  # (key in results, label, which throughput of it)
    ("tm_scan", "trustmilter scan, whole CLI run", "total"),
    ("tm_scan", "trustmilter scan, after start-up", "steady"),
    ("rspamd_scan", "rspamd scan (HTTP x2)", "total"),
    ("sa_scan", "SpamAssassin scan (spamc x2)", "total"),
    ("tm_milter", "trustmilter milter via Postfix", "total"),
    ("rspamd_milter", "rspamd milter via Postfix", "total"),
    ("postfix_alone", "Postfix alone (ceiling)", "total"),
)


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per engine and path, the figures of the table and the chart."""
    rows = []
    for key, label, which in ROWS:
        r = results.get(key)
        if r is None:
            continue
        src = r.get("steady", r) if which == "steady" else r
        m = r.get("metrics", {})
        mem = r.get("memory", {})
        mps, mpc = src.get("msgs_per_s"), src.get("msgs_per_cpu_s")
        rows.append({
            "key": key, "label": label, "engine": r.get("engine"),
            "msgs_per_s": mps, "msgs_per_s_per_core": round(mps / CORES, 1) if mps else None,
            "msgs_per_cpu_s": mpc, "cpu_ms_per_msg": round(1000 / mpc, 2) if mpc else None,
            "latency_p50_ms": r.get("latency_p50_ms", m.get("lat_ms_median")),
            "latency_p99_ms": r.get("latency_p99_ms", m.get("lat_ms_p99")),
            "peak_rss_mb": mem.get("peak_rss_mb"), "peak_pss_mb": mem.get("peak_pss_mb"),
            "auc": m.get("AUC"), "fpr_pct": m.get("FPR_pct"), "fnr_pct": m.get("FNR_pct"),
            "recall_at_fpr_0.1pct": m.get("recall_at_FPR_0.1pct"),
            "recall_at_fpr_1pct": m.get("recall_at_FPR_1pct"),
            "threshold": r.get("threshold"), "valid": r.get("valid", True),
        })
    return rows


RATIO_FIELDS = ("msgs_per_s_per_core", "msgs_per_cpu_s", "latency_p50_ms", "latency_p99_ms",
                "peak_rss_mb", "peak_pss_mb", "auc", "recall_at_fpr_0.1pct", "recall_at_fpr_1pct")


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    by = {r["label"]: r for r in rows}
    pairs = {"scan: trustmilter / rspamd": ("trustmilter scan, after start-up", "rspamd scan (HTTP x2)"),
             "scan: trustmilter / SpamAssassin": ("trustmilter scan, after start-up",
                                                  "SpamAssassin scan (spamc x2)"),
             "milter: trustmilter / rspamd": ("trustmilter milter via Postfix",
                                              "rspamd milter via Postfix")}
    out = {}
    for name, (a, b) in pairs.items():
        if a in by and b in by:
            out[name] = {f: (round(by[a][f] / by[b][f], 3) if by[a].get(f) and by[b].get(f) else None)
                         for f in RATIO_FIELDS}
    return out


def _fmt(v: Any, width: int, digits: int = 1) -> str:
    if v is None or v == "":
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{v!s:>{width}}"


def print_table(record: dict[str, Any]) -> None:
    rows = record["rows"]
    print(f"\nside by side, {record['machine']['cores']} cores, {record['timestamp']} "
          f"({record['messages']} test-split messages; milter paths: x{record['repeat']}, "
          f"8 SMTP sessions)")
    print(f"command: {record['command']}")
    head = (f"{'':<34}{'msg/s':>7}{'/core':>7}{'/CPU-s':>8}{'ms CPU':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'RSS MB':>8}{'PSS MB':>8}{'AUC':>8}{'FPR%':>7}{'FNR%':>7}{'R@.1%':>7}{'R@1%':>7}")
    print(head)
    for r in rows:
        print(f"{r['label'] + ('' if r['valid'] else ' VOID'):<34}{_fmt(r['msgs_per_s'], 7)}"
              f"{_fmt(r['msgs_per_s_per_core'], 7)}{_fmt(r['msgs_per_cpu_s'], 8)}"
              f"{_fmt(r['cpu_ms_per_msg'], 8, 2)}{_fmt(r['latency_p50_ms'], 8)}"
              f"{_fmt(r['latency_p99_ms'], 8)}{_fmt(r['peak_rss_mb'], 8, 0)}"
              f"{_fmt(r['peak_pss_mb'], 8, 0)}{_fmt(r['auc'], 8, 4)}{_fmt(r['fpr_pct'], 7, 2)}"
              f"{_fmt(r['fnr_pct'], 7, 2)}{_fmt(r['recall_at_fpr_0.1pct'], 7)}"
              f"{_fmt(r['recall_at_fpr_1pct'], 7)}")
    print("  msg/s: wall; /core: wall msg/s / cores; /CPU-s: msgs per CPU-second of the filter's "
          "own processes (ms CPU: per message);\n  p50/p99: client-side latency (trustmilter scan: "
          "the pipeline's elapsed_ms); RSS/PSS: peak of the sums over the filter's processes;\n"
          "  accuracy at default thresholds (trustmilter score >= "
          f"{record['thresholds']['trustmilter']}, rspamd >= {RSPAMD_THRESHOLD}, SpamAssassin >= "
          f"{SA_THRESHOLD}); R@x%: spam recall at FPR <= x % (metrics.py)")
    if record["ratios"]:
        print(f"\n{'ratios (trustmilter / peer)':<34}" + "".join(
            f"{h:>9}" for h in ("/core", "/CPU-s", "p50", "p99", "RSS", "PSS", "AUC", "R@.1%", "R@1%")))
        for name, rs in record["ratios"].items():
            print(f"{name:<34}" + "".join(_fmt(rs[f], 9, 3) for f in RATIO_FIELDS))
        print("  > 1: trustmilter higher (better for throughput, AUC, recall; worse for latency, memory)")
    t = record["results"].get("train", {})
    if t:
        print("\ntraining on the training split (4838 messages): " + "; ".join(
            f"{k} {v.get('wall_s')} s wall, {v.get('cpu_s', '?')} s CPU "
            f"({v.get('how', 'trustmilter train')})" for k, v in t.items()))
    tm = record["results"].get("tm_milter", {}).get("evaluation")
    if tm:
        print(f"trustmilter milter log: {tm['log_lines']} lines, actions {tm['actions']}, every "
              f"message evaluated: {tm['every_message_evaluated']}; per pass (mean score, not "
              f"inbox): {[(p['mean_score'], p['not_inbox']) for p in tm['passes']]}")
    inter = record["results"].get("interleaved")
    if inter:
        rates = {k: [p["msgs_per_s"] for p in record["results"][k].get("rounds", [])]
                 for k in ("rspamd_milter", "tm_milter")}
        print(f"milter rounds (interleaved, msgs/s): rspamd {rates['rspamd_milter']}, trustmilter "
              f"{rates['tm_milter']}; trustmilter / rspamd per round: "
              f"{inter['rate_ratio_per_round']}")
    s = record["results"].get("tm_scan")
    if s:
        print(f"trustmilter scan: start-up to first verdict {s['startup']['first_verdict_s']} s "
              f"({s['startup']['cpu_s']} s CPU); actions {s['actions']}; by action: "
              f"{s['by_action']['fpr_pct']} % ham not inbox, {s['by_action']['fnr_pct']} % spam inbox")
    dns = {k: v.get("dns_queries") for k, v in record["results"].items()
           if isinstance(v, dict) and "dns_queries" in v}
    print(f"DNS queries to the sink per phase: {dns}")
    load = {k: (v.get("load_1m_at_start"), v.get("system_cpu_busy_pct"))
            for k, v in record["results"].items() if isinstance(v, dict) and "load_1m_at_start" in v}
    print(f"machine load per phase (1-min load average at its start, system CPU busy %): {load}")
    if record.get("error"):
        print(f"\nINCOMPLETE: {record['error']}")


def write_chart(record: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in record["rows"] if r["label"] != "trustmilter scan, whole CLI run"]
    labels = [r["label"].replace(" via Postfix", "\nvia Postfix").replace(" (", "\n(")
              .replace(", after", "\nafter") for r in rows]
    colors = ["#1f77b4" if r["engine"] == "trustmilter" else "#ff7f0e" if r["engine"] == "rspamd"
              else "#2ca02c" if r["engine"] == "SpamAssassin" else "#7f7f7f" for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    x = range(len(rows))

    from matplotlib.patches import Patch

    def bars(ax: Any, fields: list[tuple[str, str]], title: str, log: bool = False) -> None:
        # Colour = engine; the second figure of each pair is hatched (the legend says which).
        width = 0.8 / len(fields)
        handles = []
        for i, (field, name) in enumerate(fields):
            vals = [r.get(field) or 0 for r in rows]
            pos = [p + (i - (len(fields) - 1) / 2) * width for p in x]
            hatch = "//" if i else ""
            b = ax.bar(pos, vals, width, color=colors, alpha=1 - 0.3 * i, hatch=hatch,
                       edgecolor="black", linewidth=0.4)
            ax.bar_label(b, labels=[f"{v:.0f}" if v else "" for v in vals], fontsize=7)
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=name))
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.legend(handles=handles, fontsize=8)

    bars(axes[0][0], [("msgs_per_cpu_s", "msgs per CPU-second"),
                      ("msgs_per_s_per_core", "wall msgs/s per core")], "throughput per core")
    bars(axes[0][1], [("latency_p50_ms", "p50"), ("latency_p99_ms", "p99")],
         "latency, ms (log scale)", log=True)
    bars(axes[1][0], [("peak_rss_mb", "peak RSS"), ("peak_pss_mb", "peak PSS")],
         "resident memory of the filter's processes, MB")
    acc = [r for r in record["rows"] if r.get("auc") and r["label"] != "trustmilter scan, whole CLI run"]
    ax = axes[1][1]
    fields = [("auc", "AUC x 100"), ("recall_at_fpr_0.1pct", "recall @ FPR<=0.1%"),
              ("recall_at_fpr_1pct", "recall @ FPR<=1%")]
    for i, (field, name) in enumerate(fields):
        vals = [(r[field] * 100 if field == "auc" else r[field]) for r in acc]
        pos = [p + (i - 1) * 0.27 for p in range(len(acc))]
        b = ax.bar(pos, vals, 0.27, label=name)
        ax.bar_label(b, labels=[f"{v:.2f}" if field == "auc" else f"{v:.1f}" for v in vals],
                     fontsize=7)
    ax.set_xticks(range(len(acc)), [r["engine"] for r in acc])
    lowest = min([r[f] * (100 if f == "auc" else 1) for r in acc for f, _n in fields] or [0])
    ax.set_ylim(max(0, lowest - 5), 102)   # the differences are in the last few per cent
    ax.set_title("accuracy on the test split (no threshold: AUC, recall at a fixed FPR), %")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"trustmilter vs rspamd 3.4 vs SpamAssassin 4.0.1, {record['machine']['cores']} "
                 f"cores, {record['timestamp']} (busy machine: figures are noisy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, Any]:
    pkgs = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *PACKAGES],
                          capture_output=True, text=True).stdout.split("\n")
    tm = subprocess.run([str(TRUSTMILTER), "--version"], capture_output=True, text=True).stdout
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "milter",
                            "rules", "models"], capture_output=True, text=True).stdout.splitlines()
    return {"trustmilter": tm.strip(), "git_head": git, "uncommitted_in_milter_rules_models": dirty,
            "python": platform.python_version(),
            "packages": dict(line.split(" ", 1) for line in pkgs if " " in line)}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "?")
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cores": CORES, "cpu": model, "mem_gb": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release(), "hostname": platform.node(),
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results directory (default: "
                        "/tmp/trustmilter-bench/side-by-side-TIMESTAMP)")
    parser.add_argument("--limit", type=int, help="only N test-split messages (both classes)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast trial: --limit 150, --repeat 1, --no-train")
    parser.add_argument("--repeat", type=int, default=None,
                        help="passes of the list through Postfix (default 3, as run_all.sh)")
    parser.add_argument("--conc", type=int, default=2,
                        help="scan.py clients for rspamd and spamd (default 2, one per core)")
    parser.add_argument("--one-after-the-other", action="store_true",
                        help="the milter runs as before: all of rspamd's passes, then all of "
                             "trustmilter's (default: interleaved rounds)")
    parser.add_argument("--tm-workers", type=int, default=0,
                        help="trustmilter's milter.workers (default 0: two per core, as shipped)")
    parser.add_argument("--no-train", action="store_true",
                        help="do not time `trustmilter train` (the peers always train)")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 150
        args.no_train = True
    args.repeat = args.repeat or (1 if args.quick else 3)
    if os.geteuid() != 0:
        print("side_by_side: needs root (Postfix, dnsmasq on port 53, the peers' daemons)",
              file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("/tmp/trustmilter-bench") / f"side-by-side-{stamp}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "peers").mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, _on_term)
    bench = Bench(out, args)
    bench.results["train"] = {}
    record: dict[str, Any] = {
        "timestamp": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": ".venv/bin/python tests/bench/side_by_side.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "versions": versions(), "repeat": args.repeat,
        "conc": args.conc, "thresholds": {"trustmilter": bench.junk, "rspamd": RSPAMD_THRESHOLD,
                                          "spamassassin": SA_THRESHOLD},
        "peers_dir": str(PEERS), "out": str(out),
    }
    started = time.perf_counter()
    status = 0
    try:
        bench.prepare()
        record["messages"] = len(bench.rows)
        bench.tm_scan()
        if not args.no_train:
            try:
                bench.tm_train()
            except Exception as exc:  # noqa: BLE001 - optional figure: the run goes on
                bench.results["train"]["trustmilter"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"trustmilter train failed: {exc}")
        bench.spamassassin()
        bench.rspamd()
        bench.postfix_start()
        if args.one_after_the_other:
            bench.rspamd_milter()
            bench.tm_milter()
        else:
            bench.milters_interleaved()
        bench.postfix_alone()
        if not bench.results["tm_milter"]["valid"]:
            status = 1
            record["error"] = ("trustmilter's log shows messages not evaluated (skip or error): "
                               "its milter figures are void")
    except (Exception, KeyboardInterrupt, Interrupted) as exc:  # noqa: BLE001 - report, clean up
        status = 1
        record["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {record['error']}")
    finally:
        bench.cleanup()
    record.setdefault("messages", len(getattr(bench, "rows", [])))
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["machine"]["loadavg_end"] = os.getloadavg()
    record["results"] = bench.results
    record["rows"] = summary_rows(bench.results)
    record["ratios"] = ratios(record["rows"])
    record["commands"] = bench.commands
    (out / "side_by_side.json").write_text(json.dumps(record, indent=1, default=str))
    if record["rows"]:
        write_chart(record, out / "side_by_side.png")
    print_table(record)
    print(f"\nJSON: {out / 'side_by_side.json'}\nchart: {out / 'side_by_side.png'}\n"
          f"logs and per-message CSVs: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
