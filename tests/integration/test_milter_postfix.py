"""End to end: a real Postfix on loopback, ``trustmilter serve`` as a real subprocess, a real DNS
server with the test domains' SPF, DKIM, DMARC and PTR records, and mail sent over SMTP with
XCLIENT setting the client address and HELO the milter sees. Delivered copies are read from a
Maildir; the hold queue through ``postqueue -j``.
"""
from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import dkim
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import TestDNSServer  # noqa: E402
from postfix import (MilterProcess, PostfixInstance, alive, free_port,  # noqa: E402
                     postfix_available, xclient)

pytestmark = [pytest.mark.postfix]
_why_not = postfix_available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=_why_not))

AUTHSERV = "mx.test.example"
RCPT = "user@dest.test"


# ---- test material ------------------------------------------------------------------------------
def rsa_key(bits: int = 2048) -> tuple[bytes, str]:
    """(private PEM, public key base64 for p=), made with openssl."""
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "k.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        f"rsa_keygen_bits:{bits}", "-out", str(pem)], check=True,
                       capture_output=True)
        der = subprocess.run(["openssl", "pkey", "-in", str(pem), "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        return pem.read_bytes(), base64.b64encode(der).decode()


def zone(dns: TestDNSServer, public_key: str) -> None:
    """The test domains. 192.0.2.0/24 is good.test's; bank.test sends from nowhere (p=reject);
    shop.test is p=quarantine; flaky.test's DMARC record cannot be fetched (SERVFAIL)."""
    dns.add("good.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns.add("sel._domainkey.good.test", "TXT", f"v=DKIM1; k=rsa; p={public_key}")
    dns.add("_dmarc.good.test", "TXT", "v=DMARC1; p=reject")
    dns.add("mail.good.test", "A", "192.0.2.10")
    dns.add("10.2.0.192.in-addr.arpa", "PTR", "mail.good.test.")
    dns.add("bank.test", "TXT", "v=spf1 -all")
    dns.add("_dmarc.bank.test", "TXT", "v=DMARC1; p=reject")
    dns.add("shop.test", "TXT", "v=spf1 -all")
    dns.add("_dmarc.shop.test", "TXT", "v=DMARC1; p=quarantine")
    dns.add("flaky.test", "TXT", "v=spf1 ?all")
    dns.on("_dmarc.flaky.test", "servfail")
    dns.add("relayed.test", "TXT", "v=spf1 ip4:203.0.113.9 -all")
    dns.add("v6.test", "TXT", "v=spf1 ip6:2001:db8::/32 -all")
    dns.add("_dmarc.v6.test", "TXT", "v=DMARC1; p=reject")


def milter_config(dns: TestDNSServer, log_file: Path, **milter: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"socket_owner": "postfix:postfix", "workers": 2,
                                "log_format": "json", "log_file": str(log_file),
                                "progress_interval": 1}
    settings.update(milter)
    return {
        "authserv_id": AUTHSERV,
        "dns": {"server": dns.address, "timeout": 1.0, "deadline": 5.0, "cache_size": 0},
        "trusted_networks": ["127.0.0.0/8", "10.0.0.0/8"],
        "trusted_relays": ["198.51.100.7/32"],
        "dmarc": {"quarantine_action": "quarantine", "temperror_action": "tempfail"},
        # A junk trigger that needs no content scoring: a HELO without a dot.
        "helo": {"scores": {"HELO_NOT_FQDN": 9.0}},   # junk is 6, quarantine 12
        "milter": settings,
        # History, reputation, the quarantine index and Bayes: beside the log, never /var/lib.
        "state": {"dir": str(log_file.parent / "state")},
    }


_counter = iter(range(1, 1_000_000))


def make_message(from_addr: str, subject: str = "Quarterly figures", extra: bytes = b"",
                 body: bytes = b"Hello,\r\n\r\nthe figures are attached in spirit.\r\n"
                 ) -> tuple[str, bytes]:
    """A message with a unique Message-ID; ``extra`` header lines go first."""
    msgid = f"<t{next(_counter)}.{os.getpid()}.{time.monotonic_ns()}@test>"
    raw = extra + (f"From: Sender <{from_addr}>\r\nTo: User <{RCPT}>\r\n"
                   f"Subject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
                   f"Message-ID: {msgid}\r\nMIME-Version: 1.0\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode() + body
    return msgid, raw


def headers_of(raw: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [(k, " ".join(str(v).split())) for k, v in msg.items()]


def our_authres(raw: bytes) -> list[str]:
    return [v for k, v in headers_of(raw) if k.lower() == "authentication-results"
            and v.split(";")[0].strip().lower() == AUTHSERV]


def queue_id_of(raw: bytes) -> str:
    received = [v for k, v in headers_of(raw) if k.lower() == "received"]
    match = re.search(r"with \w*SMTP\w* id (\w+)", received[0])
    assert match, received[0]
    return match.group(1)


def send(pf: PostfixInstance, raw: bytes, mail_from: str, addr: str = "192.0.2.10",
         helo: str = "mail.good.test", name: str = "mail.good.test", login: str | None = None,
         rcpts: tuple[str, ...] = (RCPT,)) -> None:
    with pf.smtp() as smtp:
        xclient(smtp, addr, helo, name=name, login=login)
        smtp.sendmail(mail_from, list(rcpts), raw)


def assert_not_delivered(pf: PostfixInstance, msgid: str, wait: float = 1.0) -> None:
    time.sleep(wait)
    for raw in pf.delivered():
        assert msgid.encode() not in raw, f"{msgid} was delivered"


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, str]:
    return rsa_key()


@pytest.fixture(scope="module")
def dns(dkim_key: tuple[bytes, str]) -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    zone(server, dkim_key[1])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    pf = PostfixInstance.create(extra_main={"inet_protocols": "ipv4, ipv6"})
    sock = pf.base / "milter" / "trustmilter.sock"
    pf.milters = f"unix:{sock}"
    pf.write_config()
    pf.start()
    yield pf
    pf.destroy()


@pytest.fixture(scope="module")
def milter(postfix: PostfixInstance, dns: TestDNSServer) -> Iterator[MilterProcess]:
    workdir = postfix.base / "milter"
    proc = MilterProcess(workdir, milter_config(dns, workdir / "trustmilter.log"),
                         postfix.milters).start()
    yield proc
    proc.stop()


@pytest.fixture
def pf(postfix: PostfixInstance, milter: MilterProcess) -> PostfixInstance:
    """The Postfix with the milter running in front of it."""
    assert milter.proc is not None and milter.proc.poll() is None, milter.log_text()[-2000:]
    return postfix


# ---- what users see -----------------------------------------------------------------------------
def test_pass_gets_our_header_and_exact_bytes_keep_dkim_valid(
        pf: PostfixInstance, milter: MilterProcess, dkim_key: tuple[bytes, str]) -> None:
    # Odd but legal whitespace and folding: with c=simple any change to these bytes breaks the
    # signature, so dkim=pass proves the milter hands the worker the header bytes as received.
    msgid, raw = make_message("alice@good.test",
                              extra=b"X-Odd:\tTab after colon\r\nX-Fold:  two spaces\r\n"
                                    b"\tand a folded line\r\n")
    signature = dkim.sign(raw, b"sel", b"good.test", dkim_key[0],
                          canonicalize=(b"simple", b"simple"),
                          include_headers=[b"from", b"to", b"subject", b"message-id", b"x-odd",
                                           b"x-fold"])
    send(pf, signature + raw, "alice@good.test", rcpts=(RCPT, "other@dest.test"))
    delivered = pf.find_delivered(msgid)
    ours = our_authres(delivered)
    assert len(ours) == 1, headers_of(delivered)
    assert "spf=pass smtp.mailfrom=alice@good.test" in ours[0]
    assert "dkim=pass" in ours[0] and "header.d=good.test" in ours[0]
    assert "dmarc=pass" in ours[0] and "iprev=pass policy.iprev=192.0.2.10" in ours[0]
    names = [k.lower() for k, _ in headers_of(delivered)]
    # Right below the Received header Postfix wrote for this hop.
    first_received = names.index("received")
    assert names[first_received + 1] == "authentication-results"
    assert "x-spam-flag" not in names and "x-spam-status" in names
    # Folded: no line longer than 78 characters in what we added.
    text = delivered.decode()
    block = text[text.index("Authentication-Results:"):]
    block = block[:block.index("\nX-Spam-Score")]
    assert all(len(line) <= 78 for line in block.splitlines()), block
    # The body and signed headers arrived untouched: the signature still verifies.
    record = f"v=DKIM1; k=rsa; p={dkim_key[1]}".encode()
    assert dkim.verify(delivered, dnsfunc=lambda name, timeout=5: (
        record if name.rstrip(b".") == b"sel._domainkey.good.test" else None))

    entry = milter.message(queue_id_of(delivered))
    assert entry["client_ip"] == "192.0.2.10" and entry["from"] == "<alice@good.test>"
    assert entry["rcpts"] == 2 and entry["action"] == "inbox"
    assert "DKIM_VALID" in entry["symbols"] and "DMARC_POLICY_ALLOW" in entry["symbols"]
    assert isinstance(entry["score"], float | int) and entry["elapsed_ms"] > 0


def test_forged_authentication_results_are_removed_in_reverse_order(pf: PostfixInstance) -> None:
    forged = (b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.test\r\n"
              b"Authentication-Results: other.example; spf=pass smtp.mailfrom=good.test\r\n"
              b"Authentication-Results: MX.Test.Example;\r\n\tdmarc=pass header.from=good.test\r\n")
    msgid, raw = make_message("alice@good.test", extra=forged)
    send(pf, raw, "alice@good.test")
    delivered = pf.find_delivered(msgid)
    values = [v for k, v in headers_of(delivered) if k.lower() == "authentication-results"]
    # Both forgeries are gone (deleting 1 then 3 would have removed the wrong one), the other
    # host's header is kept, and ours is the only one claiming our authserv-id.
    assert any(v.startswith("other.example;") for v in values), values
    ours = our_authres(delivered)
    assert len(ours) == 1 and "iprev=pass" in ours[0], values
    assert "bank.test" not in " ".join(values)
    assert len(values) == 2


def test_dmarc_reject_is_refused_with_550_naming_the_domain(pf: PostfixInstance,
                                                            milter: MilterProcess) -> None:
    msgid, raw = make_message("ceo@bank.test", subject="Urgent wire transfer")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(pf, raw, "ceo@bank.test", addr="203.0.113.50", helo="mail.attacker.test",
             name="[UNAVAILABLE]")
    assert refused.value.smtp_code == 550
    reply = refused.value.smtp_error.decode()
    assert reply.startswith("5.7.1 ") and "bank.test" in reply and "reject" in reply
    assert_not_delivered(pf, msgid)
    entry = next(e for e in reversed(milter.messages()) if e.get("from") == "<ceo@bank.test>")
    assert entry["action"] == "reject" and "DMARC_POLICY_REJECT" in entry["symbols"]
    assert "bank.test" in entry["reason"]


def test_quarantine_goes_to_the_hold_queue(pf: PostfixInstance, milter: MilterProcess) -> None:
    msgid, raw = make_message("orders@shop.test")
    send(pf, raw, "orders@shop.test", addr="203.0.113.51", helo="mail.elsewhere.test")
    held: list[dict[str, Any]] = []
    for _ in range(100):
        held = pf.hold_queue()
        if held:
            break
        time.sleep(0.1)
    assert len(held) == 1, pf.queue()
    queue_id = held[0]["queue_id"]
    content = pf.postcat(queue_id)
    assert msgid in content
    assert re.search(r"Authentication-Results: mx\.test\.example;.*dmarc=fail", content,
                     re.S), content
    assert_not_delivered(pf, msgid)
    entry = milter.message(queue_id)
    assert entry["action"] == "quarantine" and "shop.test" in entry["reason"]
    # The admin releases it: it is delivered, with our header.
    pf.release_hold(queue_id)
    pf.flush()
    assert our_authres(pf.find_delivered(msgid))


def test_tempfail_verdict_answers_451(pf: PostfixInstance) -> None:
    msgid, raw = make_message("news@flaky.test")
    with pytest.raises(smtplib.SMTPDataError) as deferred:
        send(pf, raw, "news@flaky.test", addr="203.0.113.52", helo="mail.flaky.test")
    assert deferred.value.smtp_code == 451
    assert deferred.value.smtp_error.decode().startswith("4.7.1 ")
    assert_not_delivered(pf, msgid)


def test_junk_gets_subject_tag_and_our_spam_headers_only(pf: PostfixInstance) -> None:
    forged = b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-100\r\n"
    msgid, raw = make_message("alice@good.test", subject="Cheap watches", extra=forged)
    send(pf, raw, "alice@good.test", helo="nodots")
    delivered = pf.find_delivered(msgid)
    headers = headers_of(delivered)
    subject = [v for k, v in headers if k.lower() == "subject"]
    assert subject == ["[SPAM] Cheap watches"]
    assert [v for k, v in headers if k.lower() == "x-spam-flag"] == ["YES"]
    status = [v for k, v in headers if k.lower() == "x-spam-status"]
    assert len(status) == 1 and status[0].startswith("Yes,") and "HELO_NOT_FQDN" in status[0]


def test_authenticated_submission_passes_unfiltered(pf: PostfixInstance,
                                                    milter: MilterProcess) -> None:
    forged = b"Authentication-Results: mx.test.example; dmarc=pass header.from=bank.test\r\n"
    msgid, raw = make_message("ceo@bank.test", extra=forged)
    # Would be a DMARC reject from an outside client; XCLIENT LOGIN makes it a SASL login.
    send(pf, raw, "ceo@bank.test", addr="203.0.113.60", helo="laptop.example",
         login="alice")
    delivered = pf.find_delivered(msgid)
    assert our_authres(delivered) == []          # forged one removed, none added
    entry = milter.message(queue_id_of(delivered))
    assert entry["action"] == "skip" and entry["why"] == "authenticated"


def test_trusted_network_passes_unfiltered(pf: PostfixInstance, milter: MilterProcess) -> None:
    forged = b"Authentication-Results: mx.test.example; dmarc=pass header.from=bank.test\r\n"
    msgid, raw = make_message("ceo@bank.test", extra=forged)
    send(pf, raw, "ceo@bank.test", addr="10.1.2.3", helo="app.internal.test")
    delivered = pf.find_delivered(msgid)
    assert our_authres(delivered) == []
    entry = milter.message(queue_id_of(delivered))
    assert entry["action"] == "skip" and entry["why"] == "trusted-network"


def test_behind_a_trusted_relay_the_first_untrusted_hop_is_the_client(pf: PostfixInstance
                                                                      ) -> None:
    hop = (b"Received: from origin.relayed.test (origin.relayed.test [203.0.113.9])\r\n"
           b"\tby relay.test (Postfix) with ESMTP id ABC123\r\n"
           b"\tfor <user@dest.test>; Mon, 03 Jun 2024 10:00:00 +0000\r\n")
    msgid, raw = make_message("bob@relayed.test", extra=hop)
    send(pf, raw, "bob@relayed.test", addr="198.51.100.7", helo="relay.test",
         name="relay.test")
    ours = our_authres(pf.find_delivered(msgid))
    assert len(ours) == 1
    # SPF allows only 203.0.113.9: a pass proves the relay's address was not used.
    assert "spf=pass smtp.mailfrom=bob@relayed.test" in ours[0], ours
    assert "policy.iprev=203.0.113.9" in ours[0], ours


def test_ipv6_client(pf: PostfixInstance, milter: MilterProcess) -> None:
    msgid, raw = make_message("carol@v6.test")
    send(pf, raw, "carol@v6.test", addr="IPV6:2001:db8::25", helo="mail.v6.test")
    delivered = pf.find_delivered(msgid)
    ours = our_authres(delivered)
    assert "spf=pass smtp.mailfrom=carol@v6.test" in ours[0], ours
    # authres quotes an IPv6 address (":" is not allowed in an RFC 8601 token).
    assert re.search(r'policy\.iprev="?2001:db8::25"?', ours[0]), ours
    assert milter.message(queue_id_of(delivered))["client_ip"] == "2001:db8::25"


def test_reload_keeps_connections_and_applies_new_config(pf: PostfixInstance,
                                                         milter: MilterProcess) -> None:
    old_config = milter.config
    new_config = dict(old_config, authserv_id="mx2.test.example")
    try:
        with pf.smtp() as smtp:
            xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
            id1, raw1 = make_message("alice@good.test")
            smtp.sendmail("alice@good.test", [RCPT], raw1)
            old_workers = _workers(milter)
            milter.reload(new_config)
            # Same SMTP session, same milter connection: the next message uses the new config,
            # forged headers included (the milter's own settings were reloaded too).
            id2, raw2 = make_message(
                "alice@good.test",
                extra=b"Authentication-Results: mx2.test.example; dkim=pass\r\n")
            smtp.sendmail("alice@good.test", [RCPT], raw2)
        first, second = pf.find_delivered(id1), pf.find_delivered(id2)
        assert our_authres(first)
        second_ar = [v for k, v in headers_of(second) if k.lower() == "authentication-results"]
        assert len(second_ar) == 1 and second_ar[0].startswith("mx2.test.example;")
        assert "iprev=pass" in second_ar[0]
        # The workers were replaced (the old ones retired after their work).
        assert old_workers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in old_workers):
            time.sleep(0.1)
        assert not [p for p in old_workers if alive(p)]
        assert _workers(milter) and not (_workers(milter) & old_workers)
    finally:
        milter.reload(old_config)


def _workers(milter: MilterProcess) -> set[int]:
    """Worker processes: the forkserver's children (the milter's own children are the
    forkserver and the resource tracker)."""
    direct = {p for p in milter.children() if _parent(p) == milter.pid}
    return {p for p in milter.children() if p not in direct}


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_reload_with_a_broken_config_keeps_running(pf: PostfixInstance,
                                                    milter: MilterProcess) -> None:
    good = milter.config
    since = len(milter.log_file_text())
    milter.config_path.write_text("milter:\n  workers: many\n")
    os.kill(milter.pid, signal.SIGUSR1)
    milter.wait_log("reload failed", since=since)
    milter.write_config(good)
    msgid, raw = make_message("alice@good.test")
    send(pf, raw, "alice@good.test")
    assert our_authres(pf.find_delivered(msgid))


# ---- lifecycle: each test has its own Postfix and milter ----------------------------------------
@pytest.fixture
def lone(dns: TestDNSServer) -> Iterator[tuple[PostfixInstance, MilterProcess]]:
    pf = PostfixInstance.create()
    pf.milters = f"unix:{pf.base / 'milter' / 'tm.sock'}"
    pf.write_config()
    workdir = pf.base / "milter"
    proc = MilterProcess(workdir, milter_config(dns, workdir / "trustmilter.log"), pf.milters)
    try:
        yield pf, proc
    finally:
        proc.stop()
        pf.destroy()


def test_sigterm_finishes_the_message_in_flight(lone: tuple[PostfixInstance, MilterProcess],
                                                dns: TestDNSServer) -> None:
    pf, milter = lone
    milter.start()
    pf.start()
    dns.add("11.2.0.192.in-addr.arpa", "PTR", "slow.good.test.")
    dns.on("11.2.0.192.in-addr.arpa", "delay:2")   # evaluation takes ~2 s
    msgid, raw = make_message("alice@good.test")
    outcome: dict[str, Any] = {}

    def sender() -> None:
        try:
            send(pf, raw, "alice@good.test", addr="192.0.2.11", helo="slow.good.test")
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=sender)
    thread.start()
    time.sleep(0.8)   # the message is now waiting for its verdict
    started = time.monotonic()
    rc = milter.stop(signal.SIGTERM, timeout=30)
    thread.join(30)
    assert rc == 0, milter.log_text()[-2000:]
    assert outcome.get("ok"), outcome
    assert our_authres(pf.find_delivered(msgid))
    assert time.monotonic() - started < 20
    assert "stopped" in milter.log_file_text()


def test_milter_killed_mid_run_mail_waits_and_arrives_after_restart(
        lone: tuple[PostfixInstance, MilterProcess], dns: TestDNSServer) -> None:
    mx, milter = lone
    # The milter sees mail from the front Postfix (127.0.0.1): trust nothing, so every message
    # is evaluated; a slow PTR answer keeps messages in flight when the milter dies.
    config = milter.config
    config["trusted_networks"] = []
    milter.write_config(config)
    dns.add("1.0.0.127.in-addr.arpa", "PTR", "localhost.")
    dns.on("1.0.0.127.in-addr.arpa", "delay:0.3")
    milter.start()
    mx.start()
    front = PostfixInstance.create(prefix="tm-front-", domains=(), hostname="front.test.example",
                                   sink=f"relay:[127.0.0.1]:{mx.port}",
                                   extra_main={"smtp_destination_concurrency_limit": "2",
                                               "default_destination_concurrency_limit": "2"})
    front.start()
    try:
        ids = []
        with front.smtp() as smtp:
            for i in range(20):
                # A sender without SPF/DMARC records: from 127.0.0.1 nothing is refused.
                msgid, raw = make_message("news@plain.test", subject=f"batch {i}")
                smtp.sendmail("news@plain.test", [RCPT], raw)
                ids.append(msgid)
        # Let a few through, then kill the milter (and so every message it holds) outright.
        deadline = time.monotonic() + 30
        while len(mx.delivered_files()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        children = milter.children()
        assert milter.stop(signal.SIGKILL) == -signal.SIGKILL
        delivered_at_kill = len(mx.delivered_files())
        assert delivered_at_kill < 20, "all delivered before the kill: test proves nothing"
        # Postfix answers 451 while the milter is away; the front keeps the rest queued.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "4.7.1" not in front.log_text():
            time.sleep(0.1)
        assert re.search(r"status=deferred .*4\.7\.1", front.log_text()), (
            f"killed at {time.strftime('%H:%M:%S')} with {delivered_at_kill} delivered\n"
            + mx.log_tail(60) + "\n---milter\n" + milter.log_text()[-3000:])
        # Each message is queued at the front or delivered; one the mx took just before the kill
        # is briefly both (delivered, not yet removed from the front's queue), so let that settle.
        deadline = time.monotonic() + 10
        while (len(front.queue()) + len(mx.delivered_files()) != 20
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert len(front.queue()) == 20 - len(mx.delivered_files())
        # The workers do not outlive their parent.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p) for p in children):
            time.sleep(0.1)
        assert not [p for p in children if alive(p)]
        # Restart and flush: everything arrives, once, with our header.
        milter.start()
        front.flush()
        front.wait_queue_empty(timeout=60)
        got = {}
        for msgid in ids:
            raw = mx.find_delivered(msgid, timeout=30)
            assert our_authres(raw), msgid
            got[msgid] = raw
        assert len(mx.delivered_files()) == 20
    finally:
        front.destroy()


def test_no_config_file_inet_socket(dns: TestDNSServer) -> None:
    """Defaults only (no --config): TCP socket and resolver from the command line."""
    import socket as socketlib
    port = free_port()
    pf = PostfixInstance.create(milters=f"inet:127.0.0.1:{port}")
    workdir = pf.base / "milter"
    proc = MilterProcess(workdir, {}, f"inet:{port}@127.0.0.1", use_config_file=False,
                         extra_args=("--resolver", dns.address, "--workers", "2",
                                     "--log-file", str(workdir / "trustmilter.log")))
    try:
        proc.start()
        pf.start()
        msgid, raw = make_message("alice@good.test")
        send(pf, raw, "alice@good.test")
        delivered = pf.find_delivered(msgid)
        host = socketlib.gethostname()
        values = [v for k, v in headers_of(delivered) if k.lower() == "authentication-results"]
        assert len(values) == 1 and values[0].startswith(f"{host};"), values
        assert "spf=pass" in values[0] and "dkim=none" in values[0]
        # Text log format by default: one grep-able line with the queue id.
        line = [ln for ln in proc.log_file_text().splitlines()
                if f"queue_id={queue_id_of(delivered)}" in ln]
        assert len(line) == 1 and "action=inbox" in line[0] and "client_ip=192.0.2.10" in line[0]
        assert "from=<alice@good.test>" in line[0] and "rcpts=1" in line[0]
    finally:
        proc.stop()
        pf.destroy()


def test_chrooted_postfix_with_the_documented_socket(dns: TestDNSServer) -> None:
    """Debian's layout (contrib/postfix/main.cf): smtpd and cleanup chrooted in the queue
    directory, the socket inside it and named relative to it in main.cf; socket_owner left
    empty, so started as root the socket gets group postfix and mode 0660."""
    import grp
    import stat
    pf = PostfixInstance.create(chroot=True, milters="unix:trustmilter/trustmilter.sock")
    sock = pf.queue_dir / "trustmilter" / "trustmilter.sock"
    workdir = pf.base / "milter"
    proc = MilterProcess(workdir, milter_config(dns, workdir / "trustmilter.log",
                                                socket_owner=""), f"unix:{sock}")
    try:
        proc.start()
        info = sock.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam("postfix").gr_gid
        pf.start()
        msgid, raw = make_message("alice@good.test")
        send(pf, raw, "alice@good.test")
        ours = our_authres(pf.find_delivered(msgid))
        assert len(ours) == 1 and "spf=pass" in ours[0]
        assert proc.stop() == 0, proc.log_text()[-3000:]
        assert not sock.exists()   # removed on a clean stop
    finally:
        proc.stop()
        pf.destroy()


def _ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))   # type: ignore[union-attr]
    gid = int(re.search(r"^Gid:\s+(\d+)", status, re.M).group(1))   # type: ignore[union-attr]
    return uid, gid


def test_started_as_root_it_becomes_milter_user_once_the_socket_is_open(
        dns: TestDNSServer) -> None:
    """Debian's layout again, started as root with milter.user: root creates the socket's
    directory in Postfix's queue directory and the socket (group postfix, 0660), then the
    milter and every process it starts (forkserver, workers) run as that user; the state it
    writes belongs to that user; a clean stop still removes the socket."""
    import grp
    import pwd
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    blocked = [str(d) for d in (Path(sys.executable).resolve(), Path(sys.base_prefix).resolve())
               for d in [d, *d.parents] if not d.stat().st_mode & 0o001]
    if blocked:   # e.g. a pyenv Python under /root (0700); contrib/bootstrap uses /usr/bin/python3
        pytest.skip(f"this Python cannot be run by another user ({blocked[0]} is closed to "
                    "others): make the venv from /usr/bin/python3")
    nobody = pwd.getpwnam("nobody")
    pf = PostfixInstance.create(chroot=True, milters="unix:trustmilter/trustmilter.sock")
    sock = pf.queue_dir / "trustmilter" / "trustmilter.sock"
    workdir = pf.base / "milter"
    proc = MilterProcess(workdir, milter_config(dns, workdir / "trustmilter.log",
                                                socket_owner="", user="nobody"), f"unix:{sock}")
    try:
        proc.start()
        assert "running as user nobody" in proc.log_file_text()
        info = sock.stat()
        assert info.st_gid == grp.getgrnam("postfix").gr_gid and info.st_mode & 0o777 == 0o660
        everyone = [proc.pid] + proc.children()
        assert len(everyone) >= 4, everyone   # milter, forkserver, resource tracker, workers
        for pid in everyone:
            assert _ids(pid) == (nobody.pw_uid, nobody.pw_gid), (pid, _ids(pid))
        pf.start()
        msgid, raw = make_message("alice@good.test")
        send(pf, raw, "alice@good.test")
        ours = our_authres(pf.find_delivered(msgid))
        assert len(ours) == 1 and "spf=pass" in ours[0]
        state = Path(proc.config["state"]["dir"])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (state / "history.sqlite").exists():
            time.sleep(0.2)   # the state writer works off the SMTP path
        for path in [state, *state.iterdir()]:
            assert path.stat().st_uid == nobody.pw_uid, path
        assert proc.stop() == 0, proc.log_text()[-3000:]
        assert not sock.exists()   # the directory we created was given to the user
    finally:
        proc.stop()
        pf.destroy()


def test_an_unknown_milter_user_is_refused_before_anything_starts(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "trustmilter.cli", "serve", "--socket",
                          f"unix:{tmp_path}/s.sock", "--user", "no-such-user-here"],
                         capture_output=True, text=True, timeout=60)
    if os.geteuid() != 0:
        pytest.skip("the user is only switched to (and checked) when started as root")
    assert res.returncode == 2, res.stderr
    assert "milter.user" in res.stderr and "no-such-user-here" in res.stderr
    assert not (tmp_path / "s.sock").exists()


def test_local_submission_through_non_smtpd_milters(pf: PostfixInstance,
                                                    milter: MilterProcess) -> None:
    """Mail from the sendmail command (pickup -> cleanup -> milter) has no network client: it
    passes unfiltered, but a forged Authentication-Results header still goes."""
    pf.set_main(non_smtpd_milters="$smtpd_milters")
    try:
        forged = b"Authentication-Results: mx.test.example; dmarc=pass header.from=bank.test\r\n"
        msgid, raw = make_message("cron@dest.test", extra=forged)
        sendmail = os.path.join(os.path.dirname(os.path.realpath(
            __import__("shutil").which("postfix") or "/usr/sbin/postfix")), "sendmail")
        res = subprocess.run([sendmail, "-C", str(pf.config_dir), "-f", "cron@dest.test", RCPT],
                             input=raw.replace(b"\r\n", b"\n"), capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        delivered = pf.find_delivered(msgid, timeout=30)
        assert our_authres(delivered) == []
        entry = milter.message(queue_id_of_local(delivered))
        assert entry["action"] == "skip" and entry["why"] == "local", entry
    finally:
        pf.set_main(non_smtpd_milters="")


def queue_id_of_local(raw: bytes) -> str:
    received = [v for k, v in headers_of(raw) if k.lower() == "received"]
    match = re.search(r"\bid (\w+)", received[0])
    assert match, received[0]
    return match.group(1)
