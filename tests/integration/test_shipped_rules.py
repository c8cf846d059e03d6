"""The shipped rule set and its fixtures, through `trustmilter rules check|test` as admins run
them: a real subprocess, the real pipeline (SPF, DKIM, DMARC, DNSBL/URIBL lookups answered by the
fixtures' loopback DNS server), real exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"


def cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "trustmilter.cli", "rules", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A site config whose local rules folder is empty (the machine's /etc is not consulted)."""
    local = tmp_path / "rules.d"
    local.mkdir()
    path = tmp_path / "trustmilter.yaml"
    path.write_text(f"rules:\n  local_dir: {local}\n")
    return path


def test_every_shipped_fixture_passes_and_every_rule_has_one(config: Path) -> None:
    result = cli("test", "--json", "--strict", str(RULES), config=config)
    report = json.loads(result.stdout)
    failures = [f for f in report["fixtures"] if not f["passed"]]
    assert failures == [], json.dumps(failures, indent=1)
    assert report["uncovered"] == []
    assert result.returncode == 0, result.stderr
    assert report["passed"] >= 80
    names = {f["name"] for f in report["fixtures"]}
    assert {"gtube_reject", "gtube_quarantine", "gtube_junk"} <= names


@pytest.mark.parametrize("fixture,action", [("gtube_reject", "reject"),
                                            ("gtube_quarantine", "quarantine"),
                                            ("gtube_junk", "junk")])
def test_gtube_drives_each_action(config: Path, fixture: str, action: str) -> None:
    result = cli("test", "--json", "-k", fixture, str(RULES), config=config)
    report = json.loads(result.stdout)
    (found,) = [f for f in report["fixtures"] if f["name"] == fixture]
    assert found["passed"] and found["action"] == action


def test_rules_check_on_the_shipped_set(config: Path) -> None:
    result = cli("check", config=config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ")
    report = json.loads(cli("check", "--json", config=config).stdout)
    assert report["ok"] and report["rules"] >= 40 and report["errors"] == []


def test_rules_check_reports_file_line_key_and_exits_1(tmp_path: Path, config: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("LOCAL_ONE:\n  description: d\n  score: 1\n  match:\n"
                   "    body: {regex: '(?=lookahead)'}\n"
                   "LOCAL_TWO:\n  description: d\n  score: 1\n  match: {nope: 1}\n")
    result = cli("check", str(bad), config=config)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{bad}:5: key 'LOCAL_ONE.match.body.regex': RE2 cannot compile")
    assert lines[1].startswith(f"{bad}:9: key 'LOCAL_TWO.match.nope': unknown condition")
    report = json.loads(cli("check", "--json", str(bad), config=config).stdout)
    assert not report["ok"]
    assert [(e["line"], e["key"]) for e in report["errors"]] == [
        (5, "LOCAL_ONE.match.body.regex"), (9, "LOCAL_TWO.match.nope")]


def test_local_rules_and_fixtures_override_shipped_ones(tmp_path: Path) -> None:
    local = tmp_path / "rules.d"
    (local / "fixtures").mkdir(parents=True)
    (local / "site.yaml").write_text(
        "URL_SHORTENER: {score: 0}\n"          # adjust a shipped rule
        "GTUBE_JUNK:\n"                        # replace one
        "  description: site GTUBE junk, held instead\n  score: 0\n  action: quarantine\n"
        "  match: {body: {contains: 'GTUBE-STANDARD-ANTI-UBE-TEST-JUNK'}}\n"
        "SITE_PROJECT_CODE:\n"                 # add one
        "  description: mentions our secret project\n  score: 3\n"
        "  match: {body: {contains: 'Project Nightjar', nocase: true}}\n")
    (local / "fixtures" / "site.yaml").write_text(
        "secret_project:\n  message: |\n    From: a@example.org\n    Subject: hi\n\n"
        "    about project nightjar\n  expect: {symbols: [SITE_PROJECT_CODE]}\n"
        "junk_string_now_held:\n  message: |\n    From: a@example.org\n    Subject: hi\n\n"
        "    XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-JUNK*C.34X\n"
        "  expect: {symbols: [GTUBE_JUNK], action: quarantine}\n")
    config = tmp_path / "trustmilter.yaml"
    config.write_text(f"rules:\n  local_dir: {local}\n")
    result = cli("test", "--json", config=config)
    report = json.loads(result.stdout)
    by_name = {f["name"]: f for f in report["fixtures"]}
    assert by_name["secret_project"]["passed"] and by_name["junk_string_now_held"]["passed"]
    # The shipped fixture for GTUBE_JUNK now fails: the override changed what the site does,
    # and `rules test` says so.
    assert not by_name["gtube_junk"]["passed"]
    assert result.returncode == 1
    check = json.loads(cli("check", "--json", config=config).stdout)
    assert check["ok"] and str(local / "site.yaml") in check["files"]


def test_a_failing_fixture_fails_the_run(tmp_path: Path, config: Path) -> None:
    fixtures = tmp_path / "fixtures.yaml"
    fixtures.write_text("wrong_expectation:\n  message: |\n    From: a@example.org\n"
                        "    Subject: hello\n\n    plain words\n"
                        "  expect: {symbols: [GTUBE_REJECT], absent: [MISSING_DATE]}\n")
    result = cli("test", str(fixtures), config=config)
    assert result.returncode == 1
    assert "FAIL wrong_expectation" in result.stdout
    assert "expected symbol GTUBE_REJECT is missing" in result.stdout
    assert "symbol MISSING_DATE is present but must not be" in result.stdout


def test_fixture_file_errors_name_file_line_and_key(tmp_path: Path, config: Path) -> None:
    fixtures = tmp_path / "fixtures.yaml"
    fixtures.write_text("f1:\n  message: 'x'\n  expect:\n    action: explode\n")
    result = cli("test", str(fixtures), config=config)
    assert result.returncode == 1
    assert f"{fixtures}:4: key 'f1.expect.action'" in result.stdout
