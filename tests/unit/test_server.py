"""The milter adapter without an MTA: what it gathers, what it hands to the workers, and which
milter actions it takes, in which order, for each verdict. A recording context stands in for
libmilter's (pymilter's own TestCtx ignores header indexes and cannot quarantine); the real-Postfix
tests in tests/integration/test_milter_postfix.py prove the same against a real MTA."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import Milter
import pytest

from trustmilter import server as srv
from trustmilter.message import ParsedMessage
from trustmilter.config import load_config
from trustmilter.server import (Settings, TrustMilter, clean_text, fold, format_log_line,
                                reply_codes, smtp_text)
from trustmilter.types import Action, Envelope, Symbol, Verdict
from trustmilter.workers import WorkerPool, default_size, prepare_context, relay_envelope


# ---- helpers ------------------------------------------------------------------------------------
class RecordingCtx:
    """Records every action in order, as libmilter would pass them to the MTA."""

    def __init__(self, macros: dict[str, str] | None = None) -> None:
        self.macros = macros or {}
        self.calls: list[tuple[Any, ...]] = []
        self._priv: Any = None

    def getpriv(self) -> Any:
        return self._priv

    def setpriv(self, priv: Any) -> None:
        self._priv = priv

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setreply(self, rcode: str, xcode: str | None, *msg: str) -> None:
        self.calls.append(("setreply", rcode, xcode) + msg)

    def addheader(self, name: str, value: str, idx: int) -> None:
        self.calls.append(("addheader", name, value, idx))

    def chgheader(self, name: str, idx: int, value: str | None) -> None:
        self.calls.append(("chgheader", name, idx, value))

    def quarantine(self, reason: str) -> None:
        self.calls.append(("quarantine", reason))

    def progress(self) -> None:
        self.calls.append(("progress",))


@dataclass
class FakeServer:
    """Stands in for MilterServer: returns a given verdict and keeps what the worker got."""

    settings: Settings
    verdict: Verdict | None = None
    error: str = ""
    seen: list[tuple[Envelope, bytes]] = field(default_factory=list)
    recorder: None = None     # no state writer: these tests look at milter actions only

    def evaluate(self, conn: TrustMilter, envelope: Envelope, raw: bytes
                 ) -> tuple[Verdict | None, str]:
        self.seen.append((envelope, raw))
        return self.verdict, self.error


def settings(**over: Any) -> Settings:
    config = load_config(None, {"authserv_id": "mx.test.example",
                                "trusted_networks": ["127.0.0.0/8", "10.0.0.0/8"]})
    return replace(Settings.from_config(config), **over)


def verdict(action: Action = Action.INBOX, **over: Any) -> Verdict:
    base = Verdict(action=action, score=1.5,
                   symbols=[Symbol("SPF_PASS", -0.5), Symbol("IPREV_NONE", 2.0)],
                   authentication_results="mx.test.example; spf=pass smtp.mailfrom=a@good.test",
                   add_headers=[("X-Spam-Score", "1.50"), ("X-Spam-Status", "No, score=1.50")])
    for key, value in over.items():
        setattr(base, key, value)
    return base


HEADERS: list[tuple[str, bytes]] = [
    ("Authentication-Results", b" mx.test.example; dkim=pass"),
    ("Received", b" from a (a [192.0.2.1])\n\tby b"),
    ("Authentication-Results", b" other.example; spf=pass"),
    ("Subject", b"  Two  spaces\n\tfolded"),
    ("X-Tab", b"\tvalue"),
    ("Authentication-Results", b" MX.TEST.EXAMPLE; dmarc=pass"),
    ("X-Spam-Flag", b" NO"),
    ("From", b" Alice <a@good.test>"),
]
BODY = [b"line one\r\n", b".dot line\r\n"]


def run_message(fake: FakeServer, *, ip: str | tuple[Any, ...] | None = ("192.0.2.10", 4321),
                family: int = socket.AF_INET, macros: dict[str, str] | None = None,
                headers: list[tuple[str, bytes]] = HEADERS, body: list[bytes] = BODY,
                protocol: int = Milter.P_HDR_LEADSPC | Milter.P_SKIP,
                ) -> tuple[TrustMilter, RecordingCtx, int]:
    class Bound(TrustMilter):
        server = fake  # type: ignore[assignment]

    ctx = RecordingCtx({"j": "mx.test.example", "{daemon_name}": "smtpd", "i": "ABC123",
                        **(macros or {})})
    m = Bound()
    m._setctx(ctx)
    m._protocol = protocol
    m.connect("mail.good.test", family, ip)
    m.hello("mail.good.test")
    m.envfrom_bytes(b"<a@good.test>", b"SIZE=100")
    m.envrcpt_bytes(b"<u@dest.test>")
    m.envrcpt_bytes(b"<v@dest.test>")
    for name, value in headers:
        m.header_bytes(name, value)
    for chunk in body:
        m.body(chunk)
    rc = m.eom()
    return m, ctx, rc


# ---- text safety --------------------------------------------------------------------------------
def test_clean_text_removes_line_breaks_and_controls() -> None:
    assert clean_text("a\r\nX-Evil: 1\nb\x00c\td") == "a X-Evil: 1 b c d"
    assert clean_text("bad \udcff byte") == "bad \ufffd byte"


def test_fold_keeps_lines_short_and_never_injects() -> None:
    value = "mx.test.example; " + "; ".join(f"dkim=pass header.d=d{i}.example" for i in range(12))
    folded = fold("Authentication-Results", value + "\r\nX-Injected: yes")
    lines = folded.split("\n\t")
    assert len(lines) > 3
    assert len("Authentication-Results: " + lines[0]) <= 78
    assert all(len(line) + 1 <= 78 for line in lines[1:])
    assert "\r" not in folded and "\nX-Injected" not in folded
    assert " ".join(lines).replace("\r\n", " ").startswith("mx.test.example; dkim=pass")
    # A single word longer than any line is cut below RFC 5322's 998-octet limit.
    assert all(len(line) < 998 for line in fold("X", "a" * 5000).split("\n\t"))


def test_smtp_text_is_one_ascii_line_with_percent_doubled() -> None:
    text = smtp_text("DMARC policy of b\u00e4nk.test is reject\r\n250 OK 100% sure")
    assert text == "DMARC policy of b?nk.test is reject 250 OK 100%% sure"
    assert len(smtp_text("x" * 2000)) <= 400


def test_reply_codes_are_made_consistent() -> None:
    assert reply_codes("550", "5.7.1", ("550", "5.7.1")) == ("550", "5.7.1")
    assert reply_codes("550", "4.7.1", ("550", "5.7.1")) == ("550", "5.7.1")
    assert reply_codes("250", None, ("451", "4.7.1")) == ("451", "4.7.1")
    assert reply_codes("421", "4.3.2", ("451", "4.7.1")) == ("421", "4.3.2")


def test_log_line_text_and_json() -> None:
    fields = {"queue_id": "ABC", "from": "<a b@x>", "action": "inbox", "reason": None,
              "symbols": "A(1),B(-0.5)"}
    assert format_log_line(fields, "text") == (
        'queue_id=ABC from="<a b@x>" action=inbox symbols=A(1),B(-0.5)')
    assert format_log_line({"from": "x\ny"}, "text") == 'from="x\\ny"'
    assert format_log_line(fields, "json").startswith('{"queue_id":"ABC"')


# ---- gathering ----------------------------------------------------------------------------------
def test_raw_message_and_envelope_handed_to_the_worker() -> None:
    fake = FakeServer(settings(), verdict())
    run_message(fake, macros={"{auth_authen}": ""})
    envelope, raw = fake.seen[0]
    assert envelope == Envelope(client_ip="192.0.2.10", client_name="mail.good.test",
                                helo="mail.good.test", mail_from="a@good.test",
                                rcpt_to=("u@dest.test", "v@dest.test"), queue_id="ABC123",
                                auth_user=None, daemon_name="smtpd",
                                mta_hostname="mx.test.example")
    # Exact header bytes (leading whitespace as sent), CRLF line ends, body untouched.
    assert raw == (b"Authentication-Results: mx.test.example; dkim=pass\r\n"
                   b"Received: from a (a [192.0.2.1])\r\n\tby b\r\n"
                   b"Authentication-Results: other.example; spf=pass\r\n"
                   b"Subject:  Two  spaces\r\n\tfolded\r\n"
                   b"X-Tab:\tvalue\r\n"
                   b"Authentication-Results: MX.TEST.EXAMPLE; dmarc=pass\r\n"
                   b"X-Spam-Flag: NO\r\n"
                   b"From: Alice <a@good.test>\r\n"
                   b"\r\n"
                   b"line one\r\n.dot line\r\n")


def test_without_leadspc_a_space_is_put_back() -> None:
    fake = FakeServer(settings(), verdict())
    run_message(fake, headers=[("Subject", b"hello"), ("X-Tab", b"\tv")], protocol=0)
    assert fake.seen[0][1].startswith(b"Subject: hello\r\nX-Tab:\tv\r\n\r\n")


def test_ipv6_and_mapped_ipv4_clients() -> None:
    fake = FakeServer(settings(), verdict())
    run_message(fake, ip=("2001:db8::25", 25, 0, 0), family=socket.AF_INET6)
    run_message(fake, ip=("::ffff:192.0.2.77", 25, 0, 0), family=socket.AF_INET6)
    assert [e.client_ip for e, _ in fake.seen] == ["2001:db8::25", "192.0.2.77"]


def test_bracketed_hostname_is_no_client_name() -> None:
    fake = FakeServer(settings(), verdict())

    class Bound(TrustMilter):
        server = fake  # type: ignore[assignment]

    m = Bound()
    m._setctx(RecordingCtx())
    m.connect("[192.0.2.10]", socket.AF_INET, ("192.0.2.10", 1))
    assert m.client_name is None and m.client_ip == "192.0.2.10"


# ---- applying -----------------------------------------------------------------------------------
def test_inbox_actions_in_order() -> None:
    fake = FakeServer(settings(), verdict())
    _, ctx, rc = run_message(fake)
    assert rc == Milter.ACCEPT
    assert ctx.calls == [
        # Forged Authentication-Results (1st and 3rd claim our id), highest index first.
        ("chgheader", "Authentication-Results", 3, None),
        ("chgheader", "Authentication-Results", 1, None),
        # Incoming spam headers of the names we write.
        ("chgheader", "X-Spam-Flag", 1, None),
        # Ours on top (index 1 = right below the MTA's own Received), leading space included.
        ("addheader", "Authentication-Results",
         " mx.test.example; spf=pass smtp.mailfrom=a@good.test", 1),
        ("addheader", "X-Spam-Score", " 1.50", 2),
        ("addheader", "X-Spam-Status", " No, score=1.50", 3),
    ]


def test_junk_tags_subject_keeping_folding() -> None:
    fake = FakeServer(settings(), verdict(Action.JUNK, subject_tag="[SPAM]"))
    _, ctx, rc = run_message(fake)
    assert rc == Milter.ACCEPT
    assert ("chgheader", "Subject", 1, " [SPAM] Two  spaces\n\tfolded") in ctx.calls
    # Already tagged: left alone.
    fake2 = FakeServer(settings(), verdict(Action.JUNK, subject_tag="[SPAM]"))
    _, ctx2, _ = run_message(fake2, headers=[("Subject", b" [SPAM] again")])
    assert not [c for c in ctx2.calls if c[1] == "Subject"]


def test_quarantine_reason_is_sanitised() -> None:
    fake = FakeServer(settings(), verdict(Action.QUARANTINE,
                                          reason="DMARC policy of shop.test\r\nis 100% bad"))
    _, ctx, rc = run_message(fake)
    assert rc == Milter.ACCEPT
    assert ctx.calls[-1] == ("quarantine", "DMARC policy of shop.test is 100% bad")
    assert any(c[0] == "addheader" and c[1] == "Authentication-Results" for c in ctx.calls)


def test_reject_and_tempfail_replies() -> None:
    fake = FakeServer(settings(), verdict(Action.REJECT, smtp_code="550", smtp_xcode="5.7.1",
                                          reason="DMARC policy of bank.test is reject"))
    _, ctx, rc = run_message(fake)
    assert rc == Milter.REJECT
    assert ctx.calls == [("setreply", "550", "5.7.1", "DMARC policy of bank.test is reject")]
    fake = FakeServer(settings(), verdict(Action.TEMPFAIL, reason="DNS\nfailed"))
    _, ctx, rc = run_message(fake)
    assert rc == Milter.TEMPFAIL
    assert ctx.calls == [("setreply", "451", "4.7.1", "DNS failed")]


@pytest.mark.parametrize("case, expected", [
    ({"macros": {"{auth_authen}": "alice"}}, "authenticated"),
    ({"ip": ("10.9.8.7", 1)}, "trusted-network"),
    ({"ip": None, "family": socket.AF_UNIX}, "local"),
    # Postfix's emulated connect for the sendmail command: 127.0.0.1, port 0.
    ({"ip": ("127.0.0.1", 0)}, "local"),
])
def test_unfiltered_mail_only_loses_forged_headers(case: dict[str, Any], expected: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeServer(settings(), verdict())
    with caplog.at_level("INFO", logger="trustmilter.message"):
        m, ctx, rc = run_message(fake, **case)
    assert rc == Milter.ACCEPT and not fake.seen
    assert f"action=skip why={expected}" in caplog.records[-1].getMessage()
    assert ctx.calls == [("chgheader", "Authentication-Results", 3, None),
                         ("chgheader", "Authentication-Results", 1, None)]


def test_trusted_relay_in_trusted_networks_is_still_evaluated() -> None:
    fake = FakeServer(settings(trusted_relays=tuple(
        __import__("ipaddress").ip_network(n) for n in ["10.0.0.5/32"])), verdict())
    run_message(fake, ip=("10.0.0.5", 1))
    assert fake.seen and fake.seen[0][0].client_ip == "10.0.0.5"


def test_too_big_is_skipped_and_body_not_kept() -> None:
    fake = FakeServer(settings(max_message_bytes=300), verdict())
    m, ctx, rc = run_message(fake, body=[b"x" * 200 + b"\r\n", b"y" * 200 + b"\r\n"])
    assert rc == Milter.ACCEPT and not fake.seen
    assert m.body_chunks == []


@pytest.mark.parametrize("on_error, rc, calls", [
    ("tempfail", Milter.TEMPFAIL,
     [("setreply", "451", "4.3.0", "trustmilter: temporary failure, please try again later")]),
    ("accept", Milter.ACCEPT, [("chgheader", "Authentication-Results", 3, None),
                               ("chgheader", "Authentication-Results", 1, None)]),
])
def test_no_verdict_applies_on_error(on_error: str, rc: int, calls: list[Any]) -> None:
    fake = FakeServer(settings(on_error=on_error), None, error="worker died")
    _, ctx, got = run_message(fake)
    assert got == rc and ctx.calls == calls


def test_one_log_line_per_message(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeServer(settings(), verdict(Action.REJECT, reason="DMARC policy of bank.test"))
    with caplog.at_level("INFO", logger="trustmilter.message"):
        run_message(fake)
    lines = [r.getMessage() for r in caplog.records if r.name == "trustmilter.message"]
    assert len(lines) == 1
    line = lines[0]
    for part in ("queue_id=ABC123", "client_ip=192.0.2.10", "from=<a@good.test>", "rcpts=2",
                 "action=reject", "score=1.5", "symbols=SPF_PASS(-0.5),IPREV_NONE(2)",
                 "elapsed_ms=", 'reason="DMARC policy of bank.test"'):
        assert part in line, line
    assert "line one" not in line   # never the message body


def test_state_is_reset_between_messages_on_one_connection() -> None:
    fake = FakeServer(settings(), verdict())
    m, _, _ = run_message(fake)
    m.envfrom_bytes(b"<b@other.test>")
    m.envrcpt_bytes(b"<w@dest.test>")
    m.header_bytes("Subject", b" second")
    m.eom()
    envelope, raw = fake.seen[1]
    assert envelope.mail_from == "b@other.test" and envelope.rcpt_to == ("w@dest.test",)
    assert raw == b"Subject: second\r\n\r\n"
    assert envelope.client_ip == "192.0.2.10" and envelope.helo == "mail.good.test"


# ---- worker processes ---------------------------------------------------------------------------
def test_default_size_is_two_per_core() -> None:
    assert default_size(3) == 3
    assert default_size(0) >= 2 and default_size(0) % 2 == 0


def test_relay_envelope_takes_the_first_untrusted_hop(make_engine: Callable[..., Any]) -> None:
    engine = make_engine({"trusted_relays": ["198.51.100.7/32"]})
    raw = (b"Received: from relay.test (relay.test [198.51.100.7]) by mx\r\n"
           b"Received: from origin.example (origin.example [203.0.113.9]) by relay.test\r\n"
           b"Subject: x\r\n\r\nbody\r\n")
    env = relay_envelope(Envelope(client_ip="198.51.100.7", helo="relay.test"),
                         ParsedMessage.parse(raw), engine)
    assert env.client_ip == "203.0.113.9" and env.helo == "origin.example"
    assert "trusted relay 198.51.100.7" in env.assumptions[0]
    only_relay = b"Received: from relay.test (relay.test [198.51.100.7]) by mx\r\n\r\nx\r\n"
    env = relay_envelope(Envelope(client_ip="198.51.100.7"), ParsedMessage.parse(only_relay),
                         engine)
    assert env.client_ip is None


def test_worker_pool_evaluates_in_other_processes(dns_server: Any, tmp_path: Path) -> None:
    import os
    dns_server.add("good.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    config = tmp_path / "c.yaml"
    config.write_text(f"authserv_id: mx.test.example\ndns: {{server: '{dns_server.address}', "
                      f"timeout: 0.5, deadline: 3.0, cache_size: 0}}\n")
    pool = WorkerPool(prepare_context(), 2, str(config), {})
    try:
        pids = pool.warm_up()
        assert pids and os.getpid() not in pids
        env = Envelope(client_ip="192.0.2.10", helo="mail.good.test", mail_from="a@good.test",
                       rcpt_to=("u@dest.test",))
        result = pool.evaluate(env, b"From: a@good.test\r\nSubject: x\r\n\r\nhi\r\n",
                               time.monotonic() + 30)
        assert result.authentication_results.startswith("mx.test.example;")
        assert "spf=pass smtp.mailfrom=a@good.test" in result.authentication_results
    finally:
        pool.shutdown()


def test_serve_refuses_a_bad_config_with_file_line_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("milter:\n  workers: 2\n  on_eror: accept\n")
    res = subprocess.run([sys.executable, "-m", "trustmilter.cli", "serve", "--config",
                          str(config), "--socket", f"unix:{tmp_path}/s.sock"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"{config}:3: key 'milter.on_eror'" in res.stderr


def test_register_cli_adds_serve() -> None:
    from trustmilter.cli import build_parser
    args = build_parser().parse_args(["serve", "--socket", "inet:9999@127.0.0.1",
                                      "--resolver", "127.0.0.1:5353", "--workers", "3"])
    assert args.func is srv.cmd_serve and args.workers == 3


def test_listener_nodelay_is_inherited_by_accepted_connections() -> None:
    from trustmilter.server import inet_port, set_listener_nodelay
    assert inet_port("inet:8894@127.0.0.1") == 8894 and inet_port("unix:/x") is None
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        assert set_listener_nodelay(port) == 1
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted.close()
        client.close()
    finally:
        listener.close()


def test_data_event_is_taken_with_a_reply() -> None:
    """Over TCP an unanswered DATA macro costs a delayed ACK (~40 ms) per message: the DATA
    callback must be negotiated and answered, not skipped or marked no-reply."""
    # protocol_mask() holds the MTA offers we refuse: refusing "no DATA" and "no reply to
    # DATA" means the MTA sends DATA and waits for our answer.
    mask = TrustMilter.protocol_mask()
    assert mask & Milter.P_NODATA and mask & Milter.P_NR_DATA
    assert not mask & Milter.P_HDR_LEADSPC          # we do want header values verbatim
    assert TrustMilter().data() == Milter.CONTINUE
