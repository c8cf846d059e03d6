"""Hostile input through ``trustmilter scan`` (a real subprocess) with the test DNS server as its
resolver: every case gets a verdict, within the deadline, and no check crashes (no *_ERROR
symbol). The 50 MB message stays bounded in time and memory (content analysis reads a prefix)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import TestDNSServer  # noqa: E402
from hostile import messages  # noqa: E402

ACTIONS = {"inbox", "junk", "quarantine", "reject", "tempfail"}
# dns.deadline below is 3 s; a message may take that plus the pipeline's grace (2 s).
DEADLINE_MS = 6000


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    server.add("good.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    server.add("_dmarc.good.test", "TXT", "v=DMARC1; p=reject")
    server.add("_dmarc.bank.test", "TXT", "v=DMARC1; p=reject")
    server.add("bank.test", "TXT", "v=spf1 -all")
    # Huge answers: only TCP can carry them (the server truncates over UDP).
    server.add("huge.test", "TXT", ["v=spf1 ip4:192.0.2.0/24"] + ["x" * 255] * 150 + [" -all"])
    for i in range(10):
        server.add("huge.test", "TXT", f"filler-{i} " + "y" * 1000)
    server.add("_dmarc.huge.test", "TXT", "v=DMARC1; p=reject; rua=mailto:" + "r" * 20000
               + "@huge.test")
    server.add("sel._domainkey.huge.test", "TXT", "v=DKIM1; k=rsa; p=" + "A" * 40000)
    yield server
    server.stop()


def scan(dns: TestDNSServer, tmp: Path, paths: list[Path], *extra: str,
         timeout: float = 120.0, config_extra: str = "") -> tuple[list[dict[str, Any]], float, int]:
    """Run ``trustmilter scan --json``; (reports, wall seconds, peak RSS in KiB)."""
    config = tmp / "config.yaml"
    config.write_text(f"authserv_id: mx.test.example\nstate: {{dir: {tmp / 'state'}}}\n"
                      "dns: {timeout: 1.0, deadline: 3.0, cache_size: 0}\n" + config_extra)
    cmd = [sys.executable, "-m", "trustmilter.cli", "scan", "--json", "--workers", "1",
           "--config", str(config), "--resolver", dns.address, "--client-ip", "192.0.2.10",
           "--helo", "mail.good.test", "--mail-from", "alice@good.test", *extra,
           *map(str, paths)]
    started = time.monotonic()
    out_path = tmp / "out.jsonl"
    with open(out_path, "wb") as out, open(tmp / "err.txt", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        # wait4 gives this child's own peak RSS (getrusage(CHILDREN) would mix in others).
        end = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > end:
                proc.kill()
                proc.wait()
                pytest.fail(f"scan still running after {timeout:g}s")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    stderr = (tmp / "err.txt").read_text(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    reports = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
    return reports, wall, usage.ru_maxrss


def assert_sane(rep: dict[str, Any]) -> None:
    assert rep["action"] in ACTIONS, rep
    crashed = [s["name"] for s in rep["symbols"] if s["name"].endswith("_ERROR")]
    assert not crashed, (rep["file"], crashed, rep["symbols"])
    assert rep["elapsed_ms"] < DEADLINE_MS, rep
    # What we would write into a header is one line.
    assert "\r" not in rep["authentication_results"] and "\n" not in rep["authentication_results"]


def test_every_hostile_case_gets_a_verdict(dns: TestDNSServer, tmp_path: Path) -> None:
    folder = tmp_path / "mail"
    folder.mkdir()
    for name, make in messages.CASES.items():
        (folder / f"{name}.eml").write_bytes(make())
    reports, _, _ = scan(dns, tmp_path, [folder])
    by_name = {Path(r["file"]).stem: r for r in reports}
    assert set(by_name) == set(messages.CASES)
    for rep in reports:
        assert_sane(rep)
    # Forged results are ignored: the From domain (p=reject, no SPF/DKIM) still fails DMARC.
    forged = by_name["forged_authres"]
    assert "dmarc=fail" in forged["authentication_results"], forged
    # 500 signatures: only dkim.max_signatures are verified, the verdict still comes.
    dkim = [s for s in by_name["dkim_absurd_500"]["symbols"] if s["name"].startswith("DKIM")]
    assert dkim, by_name["dkim_absurd_500"]["symbols"]


def test_fifty_megabytes_is_bounded(dns: TestDNSServer, tmp_path: Path) -> None:
    path = tmp_path / "big.eml"
    path.write_bytes(messages.big_message())
    reports, wall, peak_kib = scan(dns, tmp_path, [path])
    assert len(reports) == 1
    assert_sane(reports[0])
    assert wall < 45, wall
    # Measured here: ~280 MiB when run alone (the process with its model and rules is ~200 of
    # it); inside the full CI suite two runs peaked at 437 and 442 MiB, cause not yet found.
    # Before DKIM and ARC stopped splitting the body into lines a run alone took 560 MiB.
    assert peak_kib < 512 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


def test_huge_txt_answers_over_tcp(dns: TestDNSServer, tmp_path: Path) -> None:
    """SPF, DMARC and DKIM key answers far over 512 bytes (the SPF one ~50 KB in all): the
    resolver retries over TCP and the checks judge what they get."""
    raw = messages.head("huge txt", from_addr="boss@huge.test") + (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=huge.test; s=sel; h=from; bh=AAAA; b=AAAA\r\n"
        b"Content-Type: text/plain\r\n\r\nbody\r\n")
    path = tmp_path / "huge.eml"
    path.write_bytes(raw)
    before = len(dns.queries)
    reports, _, _ = scan(dns, tmp_path, [path], "--mail-from", "boss@huge.test")
    (rep,) = reports
    assert_sane(rep)
    asked = dns.queries[before:]
    assert ("huge.test", "TXT", "tcp") in asked, asked
    assert ("_dmarc.huge.test", "TXT", "tcp") in asked, asked
    ar = rep["authentication_results"]
    assert "dkim=" in ar and "dmarc=" in ar and "spf=" in ar, ar
    assert "temperror" not in ar, ar


def test_crlf_in_envelope_values_stays_out_of_headers(dns: TestDNSServer, tmp_path: Path
                                                      ) -> None:
    path = tmp_path / "crlf.eml"
    path.write_bytes(messages.crlf_subject())
    reports, _, _ = scan(dns, tmp_path, [path], "--helo", "evil.test\r\nX-Injected: helo",
                         "--mail-from", "a\r\nX-Injected: from@good.test")
    (rep,) = reports
    assert_sane(rep)
    ar = rep["authentication_results"]
    # assert_sane: one line. And the odd HELO is a quoted value, not a new result or header.
    assert 'smtp.helo="evil.test' in ar, ar


def test_pathological_regex_rule_through_scan(dns: TestDNSServer, tmp_path: Path) -> None:
    """A local rule with (a+)+$ and a 100,000-character Subject of a's ending in '!': a
    backtracking engine would not finish; RE2 does in milliseconds, and the rule is live."""
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "redos.yaml").write_text(
        "SCAN_REDOS:\n  description: exponential for backtrackers\n  score: 0.5\n"
        "  match:\n    header: {name: Subject, regex: '^(a+)+$'}\n")
    slow = tmp_path / "slow.eml"
    slow.write_bytes(messages.head("a" * 100_000 + "!") + b"\r\nbody\r\n")
    hit = tmp_path / "hit.eml"
    hit.write_bytes(messages.head("a" * 100_000) + b"\r\nbody\r\n")
    reports, _, _ = scan(dns, tmp_path, [slow, hit], config_extra=f"rules: {{local_dir: {rules}}}\n")
    by_name = {Path(r["file"]).stem: r for r in reports}
    for rep in reports:
        assert_sane(rep)
        assert rep["elapsed_ms"] < 3000, rep
    assert "SCAN_REDOS" not in [s["name"] for s in by_name["slow"]["symbols"]]
    assert "SCAN_REDOS" in [s["name"] for s in by_name["hit"]["symbols"]]
