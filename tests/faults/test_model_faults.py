"""The content model missing or corrupt, at start and at reload, through a real Postfix.
model.dir points at a copy of the shipped models/ that the tests damage. At start the milter
comes up with the model check disabled loudly (an ERROR line naming the file) and mail flows with
our header; at reload the damaged model is refused and the running one keeps scoring."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from dnsserver import TestDNSServer  # noqa: E402 (path set up by conftest)
from postfix import xclient  # noqa: E402
from test_milter_postfix import make_message, our_authres, queue_id_of  # noqa: E402

from .conftest import REPO, Harness, build_harness, skip_without_postfix

pytestmark = skip_without_postfix()


@pytest.fixture(scope="module")
def harness(fault_dns: TestDNSServer) -> Iterator[Harness]:
    def prepare(workdir: Path, config: dict[str, Any]) -> None:
        shutil.copytree(REPO / "models", workdir / "models")
        config["model"] = {"dir": str(workdir / "models")}

    yield from build_harness(fault_dns, prepare)


def model_file(h: Harness) -> Path:
    models = Path(h.base_config["model"]["dir"])
    return models / (models / "CURRENT").read_text().strip() / "model.skops"


def send_one(h: Harness) -> dict[str, Any]:
    """One message straight to the MX: it must be accepted (250) and delivered with our header;
    returns the milter's log line for it."""
    msgid, raw = make_message("alice@good.test")
    with h.mx.smtp() as smtp:
        xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
        assert smtp.sendmail("alice@good.test", ["user@dest.test"], raw) == {}
    delivered = h.mx.find_delivered(msgid)
    ours = our_authres(delivered)
    assert len(ours) == 1 and "dmarc=pass" in ours[0], ours
    return h.milter.message(queue_id_of(delivered))


def scored_by_model(entry: dict[str, Any]) -> bool:
    return "ML_HAM(" in entry["symbols"] or "ML_SPAM(" in entry["symbols"]


def remove(path: Path) -> None:
    path.unlink()


def corrupt(path: Path) -> None:
    # Same name, garbage inside: a truncated copy (a disk full during `models promote`).
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


DAMAGE: dict[str, Callable[[Path], None]] = {"missing": remove, "corrupt": corrupt}


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_model_damaged_at_reload_is_refused_and_the_running_model_scores(
        h: Harness, damage: str) -> None:
    """SIGUSR1 while the promoted model is missing/corrupt: the reload is refused with an ERROR
    naming the model, the running workers keep scoring with the model they loaded, mail flows."""
    assert scored_by_model(send_one(h))
    path = model_file(h)
    backup = path.read_bytes()
    DAMAGE[damage](path)
    try:
        since = len(h.milter.log_file_text())
        os.kill(h.milter.pid, signal.SIGUSR1)
        text = h.milter.wait_log("reload failed", timeout=60, since=since)
        refusal = text[text.index("reload failed"):].splitlines()[0]
        assert "model" in refusal and str(path) in refusal, refusal
        assert "reloaded" not in text
        entry = send_one(h)
        assert scored_by_model(entry), entry   # the old workers, the old model
    finally:
        path.write_bytes(backup)
    # Repaired: the next reload is accepted.
    h.milter.reload()
    assert scored_by_model(send_one(h))


def test_model_missing_then_corrupt_at_start_milter_starts_without_content_model(
        h: Harness) -> None:
    """The milter (re)started while the model is missing, then while it is corrupt: it starts
    each time, each worker logs an ERROR naming the check and the file, mail is delivered with
    our header, scored without ML_ symbols; restored and restarted, the model scores again.
    (Stopped with SIGKILL between runs: a clean stop waits ~5 s on libmilter's listener.)"""
    path = model_file(h)
    backup = path.read_bytes()
    try:
        for damage in ("missing", "corrupt"):
            h.milter.stop(signal.SIGKILL)
            path.write_bytes(backup)
            DAMAGE[damage](path)
            since = len(h.milter.log_file_text())
            h.milter.start()
            text = h.milter.log_file_text()[since:]
            errors = [line for line in text.splitlines()
                      if " ERROR " in line and "check model disabled" in line]
            assert errors and str(path) in errors[0], text
            entry = send_one(h)
            assert not scored_by_model(entry), entry
            assert entry["action"] == "inbox", entry
    finally:
        h.milter.stop(signal.SIGKILL)
        path.write_bytes(backup)
        h.milter.start()
    assert scored_by_model(send_one(h))
