"""End to end with a real Sendmail 8.17 (Debian's packages unpacked, not installed; see
tests/integration/sendmail.py): the same checks as with Postfix, where Sendmail supports them.
Sendmail has no XCLIENT, so the client is 127.0.0.1 and the test domains authorise it. Sendmail
relays what it accepts to a Postfix sink whose Maildir the tests read."""
from __future__ import annotations

import json
import re
import signal
import smtplib
import sys
import time
from pathlib import Path
from typing import Iterator

import dkim
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import TestDNSServer  # noqa: E402
from postfix import MilterProcess, PostfixInstance, postfix_available  # noqa: E402
from sendmail import SendmailInstance, sendmail_available  # noqa: E402
from test_milter_postfix import (RCPT, headers_of, make_message, milter_config,  # noqa: E402
                                 our_authres, rsa_key)

pytestmark = [pytest.mark.postfix]
_why_not = postfix_available() or sendmail_available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=_why_not))


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    return rsa_key()


@pytest.fixture(scope="module")
def dns(key: tuple[bytes, str]) -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    server.add("local.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    server.add("sel._domainkey.local.test", "TXT", f"v=DKIM1; k=rsa; p={key[1]}")
    server.add("_dmarc.local.test", "TXT", "v=DMARC1; p=reject")
    server.add("1.0.0.127.in-addr.arpa", "PTR", "mta.local.test.")
    server.add("mta.local.test", "A", "127.0.0.1")
    server.add("bank.test", "TXT", "v=spf1 -all")
    server.add("_dmarc.bank.test", "TXT", "v=DMARC1; p=reject")
    server.add("shop.test", "TXT", "v=spf1 -all")
    server.add("_dmarc.shop.test", "TXT", "v=DMARC1; p=quarantine")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sink() -> Iterator[PostfixInstance]:
    pf = PostfixInstance.create(prefix="tm-sink-").start()
    yield pf
    pf.destroy()


@pytest.fixture(scope="module")
def milter(sink: PostfixInstance, dns: TestDNSServer) -> Iterator[MilterProcess]:
    workdir = sink.base / "milter"
    config = milter_config(dns, workdir / "trustmilter.log", socket_owner="")
    config["trusted_networks"] = []    # every client is 127.0.0.1 here
    proc = MilterProcess(workdir, config, f"unix:{workdir / 'tm.sock'}").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def sendmail(sink: PostfixInstance, milter: MilterProcess) -> Iterator[SendmailInstance]:
    sm = SendmailInstance.create(sink.port, milter.socket_spec).start()
    yield sm
    sm.destroy()


def send(sm: SendmailInstance, raw: bytes, mail_from: str) -> None:
    with sm.smtp() as smtp:
        smtp.ehlo("mta.local.test")
        smtp.sendmail(mail_from, [RCPT], raw)


def test_pass_gets_our_header_and_dkim_survives(sendmail: SendmailInstance,
                                                sink: PostfixInstance,
                                                key: tuple[bytes, str]) -> None:
    msgid, raw = make_message("alice@local.test",
                              extra=b"X-Odd:\tTab after colon\r\nX-Fold:  two spaces\r\n"
                                    b"\tand a folded line\r\n")
    signed = dkim.sign(raw, b"sel", b"local.test", key[0], canonicalize=(b"simple", b"simple"),
                       include_headers=[b"from", b"to", b"subject", b"message-id", b"x-odd",
                                        b"x-fold"]) + raw
    send(sendmail, signed, "alice@local.test")
    delivered = sink.find_delivered(msgid, timeout=30)
    ours = our_authres(delivered)
    assert len(ours) == 1, headers_of(delivered)
    for part in ("spf=pass smtp.mailfrom=alice@local.test", "dkim=pass", "header.d=local.test",
                 "dmarc=pass", "iprev=pass policy.iprev=127.0.0.1"):
        assert part in ours[0], ours
    # Below Sendmail's own Received header (the second Received: the sink added the first).
    names = [k.lower() for k, _ in headers_of(delivered)]
    second_received = [i for i, n in enumerate(names) if n == "received"][1]
    assert names[second_received + 1] == "authentication-results"


def test_forged_authentication_results_removed(sendmail: SendmailInstance,
                                               sink: PostfixInstance) -> None:
    forged = (b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.test\r\n"
              b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x@local.test\r\n"
              b"Authentication-Results: mx.test.example; dmarc=pass header.from=bank.test\r\n")
    msgid, raw = make_message("alice@local.test", extra=forged)
    send(sendmail, raw, "alice@local.test")
    delivered = sink.find_delivered(msgid, timeout=30)
    values = [v for k, v in headers_of(delivered) if k.lower() == "authentication-results"]
    assert len(values) == 2 and any(v.startswith("other.example;") for v in values), values
    assert len(our_authres(delivered)) == 1 and "bank.test" not in " ".join(values)


def test_dmarc_reject_550(sendmail: SendmailInstance, sink: PostfixInstance) -> None:
    msgid, raw = make_message("ceo@bank.test")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(sendmail, raw, "ceo@bank.test")
    assert refused.value.smtp_code == 550
    reply = refused.value.smtp_error.decode()
    assert reply.startswith("5.7.1 ") and "bank.test" in reply and "reject" in reply


def test_quarantine_stays_in_sendmails_queue(sendmail: SendmailInstance,
                                             sink: PostfixInstance) -> None:
    msgid, raw = make_message("orders@shop.test")
    send(sendmail, raw, "orders@shop.test")
    held: dict[str, str] = {}
    for _ in range(100):
        held = {n: t for n, t in sendmail.quarantined().items() if msgid in t}
        if held:
            break
        time.sleep(0.1)
    assert len(held) == 1, sendmail.queue_files()
    text = next(iter(held.values()))
    reason = [line for line in text.splitlines() if line.startswith("q")][0]
    assert "shop.test" in reason
    assert re.search(r"Authentication-Results: mx\.test\.example;", text)
    time.sleep(1)
    assert not [r for r in sink.delivered() if msgid.encode() in r]
    # The admin's release command (contrib/sendmail/trustmilter.mc) delivers it.
    name = next(iter(held))
    output = sendmail.release(name[2:])
    assert our_authres(sink.find_delivered(msgid, timeout=30)), output


def test_junk_subject_tag(sendmail: SendmailInstance, sink: PostfixInstance,
                          milter: MilterProcess) -> None:
    msgid, raw = make_message("alice@local.test", subject="Cheap watches")
    with sendmail.smtp() as smtp:
        smtp.ehlo("nodots")        # HELO_NOT_FQDN scores 9 in the test config: junk
        smtp.sendmail("alice@local.test", [RCPT], raw)
    headers = headers_of(sink.find_delivered(msgid, timeout=30))
    assert [v for k, v in headers if k.lower() == "subject"] == ["[SPAM] Cheap watches"], (
        json.dumps(milter.messages()[-1]))
    assert [v for k, v in headers if k.lower() == "x-spam-flag"] == ["YES"]


def test_milter_down_tempfails_then_recovers(sendmail: SendmailInstance, sink: PostfixInstance,
                                             milter: MilterProcess) -> None:
    milter.stop(signal.SIGKILL)
    try:
        msgid, raw = make_message("alice@local.test")
        with pytest.raises(smtplib.SMTPResponseException) as deferred:
            send(sendmail, raw, "alice@local.test")
        assert deferred.value.smtp_code == 451
        assert deferred.value.smtp_error.decode().startswith("4.3.2")
    finally:
        milter.start()
    # The client retries (as a sending MTA would): accepted and filtered now.
    send(sendmail, raw, "alice@local.test")
    assert our_authres(sink.find_delivered(msgid, timeout=30))

