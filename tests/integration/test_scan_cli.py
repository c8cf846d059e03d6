"""`trustmilter scan` as users run it: a real subprocess, real files, the real test DNS server."""
from __future__ import annotations

import json
import mailbox
import subprocess
import sys
from pathlib import Path

import pytest

MSG = (b"Received: from mail.example.org (mail.example.org [192.0.2.10])\n"
       b"\tby mx.test.example (Postfix) with ESMTP id ABC123; Mon, 23 Nov 2026 10:00:00 +0000\n"
       b"Return-Path: <alice@example.org>\n"
       b"From: Alice <alice@example.org>\nTo: bob@test.example\nSubject: hello %d\n"
       b"Message-ID: <%d@example.org>\n\nHi Bob.\n")


def scan(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "trustmilter.cli", "scan", *args]
    if config:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def local_config(tmp_path: Path, dns_server) -> Path:
    path = tmp_path / "trustmilter.yaml"
    path.write_text(f"authserv_id: mx.test.example\ndns:\n  server: \"{dns_server.address}\"\n"
                    "  timeout: 0.5\n  deadline: 3\n")
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "mail.example.org.")
    dns_server.add("mail.example.org", "A", "192.0.2.10")
    return path


def test_json_one_object_per_message_with_stable_keys(tmp_path: Path, local_config: Path) -> None:
    for i in range(3):
        (tmp_path / f"m{i}.eml").write_bytes(MSG % (i, i))
    result = scan("--json", str(tmp_path / "m0.eml"), str(tmp_path / "m1.eml"),
                  str(tmp_path / "m2.eml"), config=local_config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        rep = json.loads(line)
        assert {"file", "action", "score", "symbols", "authentication_results",
                "elapsed_ms"} <= set(rep)
        assert rep["file"].endswith(f"m{i}.eml")  # input order kept across workers
        assert rep["action"] in {"inbox", "junk", "quarantine", "reject", "tempfail"}
        assert rep["authentication_results"].startswith("mx.test.example;")
        assert all(set(s) == {"name", "score", "reason"} for s in rep["symbols"])
        assert "IPREV_PASS" in [s["name"] for s in rep["symbols"]]
        assert any("192.0.2.10" in a for a in rep["assumptions"])


def test_envelope_options_replace_assumptions(tmp_path: Path, local_config: Path) -> None:
    (tmp_path / "m.eml").write_bytes(MSG % (1, 1))
    result = scan("--json", "--client-ip", "192.0.2.200", "--helo", "other.example",
                  "--mail-from", "x@example.org", "--rcpt", "bob@test.example",
                  str(tmp_path / "m.eml"), config=local_config)
    rep = json.loads(result.stdout)
    assert rep["assumptions"] == []
    assert "policy.iprev=192.0.2.200" in rep["authentication_results"]


def test_directory_mbox_and_maildir(tmp_path: Path, local_config: Path) -> None:
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.eml").write_bytes(MSG % (1, 1))
    (d / "sub" / "b.eml").write_bytes(MSG % (2, 2))
    box = mailbox.mbox(str(tmp_path / "box.mbox"))
    for i in range(3):
        box.add(MSG % (i, i))
    box.close()
    md = mailbox.Maildir(str(tmp_path / "maildir"))
    md.add(MSG % (7, 7))
    md.close()
    result = scan("--json", str(d), str(tmp_path / "box.mbox"), str(tmp_path / "maildir"),
                  config=local_config)
    assert result.returncode == 0, result.stderr
    files = [json.loads(line)["file"] for line in result.stdout.splitlines()]
    assert len(files) == 6
    assert sum("box.mbox#" in f for f in files) == 3


def test_human_output_says_what_was_assumed(tmp_path: Path, local_config: Path) -> None:
    (tmp_path / "m.eml").write_bytes(MSG % (1, 1))
    result = scan(str(tmp_path / "m.eml"), config=local_config)
    assert result.returncode == 0
    assert "action: " in result.stdout and "Authentication-Results: mx.test.example;" in result.stdout
    assert "assumed: client IP 192.0.2.10" in result.stdout


def test_errors_exit_nonzero_with_clear_message(tmp_path: Path, local_config: Path) -> None:
    result = scan(str(tmp_path / "missing.eml"), config=local_config)
    assert result.returncode == 2 and "no such file" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("dns:\n  nameserver: 1.2.3.4\n")
    result = scan(str(local_config), config=bad)
    assert result.returncode == 2
    assert f"{bad}:2: key 'dns.nameserver'" in result.stderr


def test_hostile_input_still_gets_a_verdict(tmp_path: Path, local_config: Path) -> None:
    (tmp_path / "junk.eml").write_bytes(b"\x00\xff garbage\r\n\r\n\x00")
    (tmp_path / "empty.eml").write_bytes(b"")
    result = scan("--json", str(tmp_path / "junk.eml"), str(tmp_path / "empty.eml"),
                  config=local_config)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
