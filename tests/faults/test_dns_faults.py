"""DNS faults through a real Postfix: the resolver down, slow past the deadline, SERVFAIL for
every name, and answers that only come over TCP. Verdicts still come (the milter logs a verdict,
not an error), DNS failures are temperror symbols and never a fail result, and
dmarc.temperror_action decides between 451 (the sender's queue keeps the message and it arrives
once DNS is back) and delivery with dmarc=temperror."""
from __future__ import annotations

import re
from typing import Any

import pytest

from postfix import free_port, xclient  # noqa: E402 (path set up by conftest)
from test_milter_postfix import make_message, our_authres, queue_id_of  # noqa: E402

from .conftest import Harness, skip_without_postfix, wait_for

pytestmark = skip_without_postfix()

# Symbols that would mean a DNS failure was taken for an authentication failure.
FAIL_SYMBOLS = ("SPF_FAIL", "SPF_SOFTFAIL", "SPF_HELO_FAIL", "DMARC_POLICY_REJECT",
                "DMARC_POLICY_QUARANTINE", "DMARC_POLICY_SOFTFAIL", "IPREV_FAIL", "DKIM_INVALID")


def send_via_front(h: Harness, count: int = 1, sender: str = "alice@good.test") -> list[str]:
    """Messages from good.test's own server (XCLIENT 192.0.2.10) handed to the front MTA, which
    relays them to the MX: the front is the sender's queue."""
    ids = []
    with h.front.smtp() as smtp:
        xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
        for i in range(count):
            msgid, raw = make_message(sender, subject=f"fault {i}")
            smtp.sendmail(sender, ["user@dest.test"], raw)
            ids.append(msgid)
    return ids


def verdict_lines(h: Harness, since: int) -> list[dict[str, Any]]:
    return [e for e in h.milter.messages()[since:] if e.get("from") == "<alice@good.test>"]


def assert_no_fail(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        symbols = re.findall(r"([A-Z0-9_]+)\(", entry.get("symbols", ""))
        assert not set(symbols) & set(FAIL_SYMBOLS), entry


def fault_then_recover(h: Harness, expect_symbols: tuple[str, ...]) -> dict[str, Any]:
    """With the fault set: one message through the front must be deferred with the verdict's
    451 4.7.1 (dmarc.temperror_action: tempfail), the front keeps it; then DNS recovers and it is
    delivered with our header saying pass. Returns the milter's log line of the deferral."""
    seen = len(h.milter.messages())
    log_at = len(h.front.log_text())
    [msgid] = send_via_front(h)
    replies = wait_for(lambda: h.deferred_replies(log_at), 30, "front saw a deferral", h.detail)
    assert replies[0].startswith("451 4.7.1 "), replies
    assert "DNS" in replies[0] or "temporar" in replies[0].lower(), replies
    # The front's queue holds it (deferred), the MX delivered nothing.
    # (Polled: the front logs the 451 a moment before its queue manager files the message.)
    def held_by_front() -> list[dict[str, Any]] | None:
        queued = h.front.queue()
        ok = len(queued) == 1 and queued[0]["queue_name"] in ("deferred", "active")
        return queued if ok else None

    queued = wait_for(held_by_front, 30, "the front holds the message", h.detail)
    assert len(queued) == 1, queued
    assert not [raw for raw in h.mx.delivered() if msgid.encode() in raw]
    entries = wait_for(lambda: verdict_lines(h, seen), 10, "milter logged a verdict")
    # A verdict (not "error-tempfail": the milter never gave up on the message).
    assert entries[0]["action"] == "tempfail", entries
    for name in expect_symbols:
        assert name in entries[0]["symbols"], entries[0]
    assert_no_fail(entries)
    # The fault clears: the front's retry delivers it, once, with our header.
    h.dns.default_behaviour = None
    delivered = h.wait_all_delivered([msgid])[msgid]
    ours = our_authres(delivered)
    assert len(ours) == 1 and "spf=pass" in ours[0] and "dmarc=pass" in ours[0], ours
    return entries[0]


def test_dns_servfail_everywhere_defers_and_arrives_after_recovery(h: Harness) -> None:
    """Every name SERVFAILs: spf/dmarc temperror, the sender's MTA sees 451 4.7.1 and queues."""
    h.dns.default_behaviour = "servfail"
    entry = fault_then_recover(h, ("SPF_TEMPERROR",))
    assert "DMARC_DNSFAIL" in entry["symbols"] or "temperror" in entry.get("reason", "")


def test_dns_server_down_defers_and_arrives_after_recovery(h: Harness) -> None:
    """The resolver's port is closed (ICMP port unreachable): same as SERVFAIL for the sender."""
    down = h.config(dns={"server": f"127.0.0.1:{free_port()}"})
    h.milter.reload(down)
    try:
        seen = len(h.milter.messages())
        log_at = len(h.front.log_text())
        [msgid] = send_via_front(h)
        replies = wait_for(lambda: h.deferred_replies(log_at), 30, "front saw a deferral",
                           h.detail)
        assert replies[0].startswith("451 4.7.1 "), replies
        entries = wait_for(lambda: verdict_lines(h, seen), 10, "milter logged a verdict")
        assert entries[0]["action"] == "tempfail" and "SPF_TEMPERROR" in entries[0]["symbols"]
        assert_no_fail(entries)
        assert h.front.queue(), "the sender's queue must keep the message"
    finally:
        h.milter.reload(h.base_config)
    delivered = h.wait_all_delivered([msgid])[msgid]
    assert "dmarc=pass" in our_authres(delivered)[0]


def test_dns_slow_past_the_deadline_defers_within_the_deadline(h: Harness) -> None:
    """Every answer comes 3 s late (query timeout 0.5 s, message deadline 2 s): the verdict
    comes at the deadline, temperror, and the message waits in the sender's queue."""
    h.dns.default_behaviour = "delay:3"
    entry = fault_then_recover(h, ("SPF_TEMPERROR",))
    # The 2 s deadline bounded the evaluation (several queries of 0.5 s each, some retried,
    # would take longer); the margin is for a loaded CI machine.
    assert entry["eval_ms"] < 3500, entry


def test_dns_truncated_answers_are_fetched_over_tcp(h: Harness) -> None:
    """Every UDP answer is truncated (TC=1): the resolver retries over TCP, so nothing fails."""
    h.dns.default_behaviour = "truncate"
    before = len(h.dns.queries)
    log_at = len(h.front.log_text())
    [msgid] = send_via_front(h)
    delivered = h.wait_all_delivered([msgid])[msgid]
    ours = our_authres(delivered)
    assert "spf=pass" in ours[0] and "dmarc=pass" in ours[0] and "iprev=pass" in ours[0], ours
    tcp = [q for q in h.dns.queries[before:] if q[2] == "tcp"]
    assert any(q[0].rstrip(".") == "_dmarc.good.test" for q in tcp), h.dns.queries[before:]
    assert not h.deferred_replies(log_at)


def test_dns_servfail_with_temperror_action_accept_delivers_temperror(h: Harness) -> None:
    """dmarc.temperror_action: accept: the same fault delivers at once, dmarc=temperror in our
    header, nothing marked as failed."""
    h.milter.reload(h.config(dmarc={"temperror_action": "accept"}))
    try:
        h.dns.default_behaviour = "servfail"
        # Straight to the MX: the SMTP reply the sender sees is 250.
        msgid, raw = make_message("alice@good.test")
        with h.mx.smtp() as smtp:
            xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
            refused = smtp.sendmail("alice@good.test", ["user@dest.test"], raw)
        assert refused == {}
        delivered = h.mx.find_delivered(msgid)
        ours = our_authres(delivered)
        assert "dmarc=temperror" in ours[0] and "spf=temperror" in ours[0], ours
        entry = h.milter.message(queue_id_of(delivered))
        assert entry["action"] in ("inbox", "junk"), entry
        assert_no_fail([entry])
    finally:
        h.dns.default_behaviour = None
        h.milter.reload(h.base_config)
