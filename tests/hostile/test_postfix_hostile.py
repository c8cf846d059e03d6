"""Hostile input through a real Postfix with ``trustmilter serve`` in front of it (one instance
for the module). Each message must end delivered, held, or refused with a reply the sender saw,
and the milter must have logged a decision for it: nothing lost, nothing stuck in the queue.

Also the service's security facts that only a running milter shows: the socket mode as
configured, the state files private (0600 in a 0700 directory), and no message body in its log.
"""
from __future__ import annotations

import re
import smtplib
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "integration"))

from dnsserver import TestDNSServer  # noqa: E402
from hostile import messages  # noqa: E402
from postfix import MilterProcess, PostfixInstance, postfix_available, xclient  # noqa: E402
from test_milter_postfix import AUTHSERV, RCPT, milter_config, zone  # noqa: E402

from trustmilter.message import ParsedMessage  # noqa: E402

pytestmark = [pytest.mark.postfix]
_why_not = postfix_available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=_why_not))

SOCKET_MODE = "0600"      # not the default 0660: the test shows the configured mode is used
PATHOLOGICAL_RULE = """\
HOSTILE_REDOS:
  description: A backtracking regex engine would never finish this on a long run of a's
  score: 0.5
  match:
    body: {regex: '(a+)+$'}
HOSTILE_NESTED:
  description: Nested quantifiers over alternation, equally exponential for backtrackers
  score: 0.5
  match:
    header: {name: Subject, regex: '^(a|aa)+(b|a)*c$'}
HOSTILE_REASON:
  description: A reason an admin wrote with line breaks in it (YAML escapes)
  score: 1
  action: reject
  reason: "refused here\\r\\nX-Injected-Reply: yes\\r\\n250 fake"
  match:
    header: {name: Subject, contains: trigger-reason-injection}
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    zone(server, "")          # no DKIM key needed here
    # Answers only TCP can carry (the server truncates over UDP), ~50 KB for the SPF name.
    server.add("huge.test", "TXT", ["v=spf1 ip4:192.0.2.0/24 "] + ["x" * 255] * 150 + [" -all"])
    for i in range(10):
        server.add("huge.test", "TXT", f"filler-{i} " + "y" * 1000)
    server.add("_dmarc.huge.test", "TXT", "v=DMARC1; p=reject; rua=mailto:" + "r" * 20000
               + "@huge.test")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup(dns: TestDNSServer) -> Iterator[tuple[PostfixInstance, MilterProcess]]:
    # 60 MB: room for the 50 MB message (the default 20 MB would refuse it before the milter).
    pf = PostfixInstance.create(prefix="tm-hostile-",
                                extra_main={"message_size_limit": str(60 * 1024 * 1024),
                                            "virtual_mailbox_limit": str(120 * 1024 * 1024)})
    workdir = pf.base / "milter"
    pf.milters = f"unix:{workdir / 'tm.sock'}"
    pf.write_config()
    config = milter_config(dns, workdir / "trustmilter.log", socket_mode=SOCKET_MODE)
    config["rules"] = {"local_dir": str(workdir / "rules.d")}
    (workdir / "rules.d").mkdir(parents=True, exist_ok=True)
    (workdir / "rules.d" / "hostile.yaml").write_text(PATHOLOGICAL_RULE)
    milter = MilterProcess(workdir, config, pf.milters)
    try:
        milter.start()
        pf.start()
        yield pf, milter
    finally:
        milter.stop()
        pf.destroy()


@dataclass
class Outcome:
    code: int
    reply: str
    queue_id: str | None
    seconds: float


_nonce = iter(range(1, 10**9))


def send_raw(pf: PostfixInstance, raw: bytes, mail_from: str = "alice@good.test",
             helo: str = "mail.good.test", timeout: float = 120.0) -> Outcome:
    """SMTP DATA with the bytes as they are (smtplib.sendmail would turn bare CR and LF into
    CRLF); only dot-stuffing is applied. Returns the final reply the sender saw."""
    stuffed = re.sub(rb"(?m)^\.", b"..", raw)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    started = time.monotonic()
    with pf.smtp(timeout=timeout) as smtp:
        xclient(smtp, "192.0.2.10", helo, name="mail.good.test")
        code, text = smtp.mail(mail_from)
        assert code == 250, text
        code, text = smtp.rcpt(RCPT)
        assert code == 250, text
        code, text = smtp.docmd("DATA")
        assert code == 354, text
        smtp.send(stuffed + b".\r\n")
        code, text = smtp.getreply()
    reply = text.decode("utf-8", "replace")
    match = re.search(r"queued as (\w+)", reply)
    return Outcome(code, reply, match.group(1) if match else None, time.monotonic() - started)


def authres_values(raw: bytes) -> list[str]:
    """Every Authentication-Results value, unfolded. Our own header parser: the stdlib's
    recurses once per MIME level and overflows the stack on the 1000-deep message."""
    return [" ".join(v.split()) for v in ParsedMessage.parse(raw).get_all("Authentication-Results")]


def our_authres(raw: bytes) -> list[str]:
    return [v for v in authres_values(raw)
            if v.split(";")[0].split("(")[0].strip().lower() == AUTHSERV]


def tagged(raw: bytes, token: str) -> bytes:
    """The message with a unique header first, to find its delivered copy."""
    return f"X-Hostile-Token: {token}\r\n".encode() + raw


def delivered_with(pf: PostfixInstance, token: str, timeout: float = 60.0) -> bytes | None:
    needle = f"X-Hostile-Token: {token}".encode()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for path in pf.delivered_files():
            with open(path, "rb") as fh:
                head = fh.read(4096)
            if needle in head:
                return path.read_bytes()
        time.sleep(0.1)
    return None


def account(pf: PostfixInstance, milter: MilterProcess, token: str, out: Outcome
            ) -> tuple[str, bytes | None]:
    """Where the message went: ("refused" | "held" | "delivered", delivered bytes)."""
    if out.code != 250:
        # Refused: a proper SMTP reply (class 4 or 5) the sender saw, and the milter said why.
        assert 400 <= out.code < 600 and out.reply.strip(), out
        return "refused", None
    assert out.queue_id, out
    entry = milter.message(out.queue_id, timeout=30)
    assert entry["action"] in ("inbox", "junk", "quarantine", "skip"), entry
    if entry["action"] == "quarantine":
        held = [m for m in pf.hold_queue() if m["queue_id"] == out.queue_id]
        assert held, pf.queue()
        return "held", None
    raw = delivered_with(pf, token)
    assert raw is not None, (f"{token} ({out.queue_id}) not delivered: {pf.queue()}\n"
                             f"{pf.log_tail()}")
    return "delivered", raw


CASES = {name: make for name, make in messages.CASES.items() if name != "crlf_subject"}


def test_every_hostile_case_is_accounted_for(setup: tuple[PostfixInstance, MilterProcess]
                                             ) -> None:
    pf, milter = setup
    where: dict[str, str] = {}
    for name, make in CASES.items():
        token = f"{name}-{next(_nonce)}"
        out = send_raw(pf, tagged(make(), token))
        # dns.deadline is 5 s in this milter's config; nothing may take much longer.
        assert out.seconds < 30, (name, out)
        where[name], raw = account(pf, milter, token, out)
        if raw is not None:
            assert len(our_authres(raw)) == 1, name
            for line in raw.split(b"\n"):
                if line.startswith((b"Authentication-Results:", b"X-Spam-")):
                    assert len(line) <= 998, (name, line[:200])
    assert not [m for m in pf.queue() if m.get("queue_name") != "hold"], pf.queue()
    # Most of these are ordinary mail in odd clothes: they must reach the inbox, not vanish
    # into refusals (what refuses them is a rule or DMARC, named in the log).
    assert list(where.values()).count("delivered") >= len(CASES) - 3, where


def test_forged_authentication_results_are_removed(setup: tuple[PostfixInstance, MilterProcess]
                                                   ) -> None:
    pf, milter = setup
    token = f"forged-{next(_nonce)}"
    raw = messages.forged_authres().replace(b"ceo@bank.test", b"alice@good.test")
    out = send_raw(pf, tagged(raw, token))
    state, delivered = account(pf, milter, token, out)
    assert state == "delivered" and delivered is not None, (out, milter.log_text()[-3000:])
    values = authres_values(delivered)
    ours = our_authres(delivered)
    assert len(ours) == 1 and "dmarc=pass" in ours[0] and "header.d=bank.test" not in ours[0], values
    assert any(v.startswith("other.example;") for v in values), values   # not ours: kept


def test_crlf_in_subject_and_helo_cannot_add_headers(setup: tuple[PostfixInstance, MilterProcess]
                                                     ) -> None:
    """A HELO without a dot scores junk (9) in this config, so the Subject gets our tag: the
    rewrite must not turn the bare CR or the encoded CRLF into a header of the sender's."""
    pf, milter = setup
    token = f"crlf-{next(_nonce)}"
    out = send_raw(pf, tagged(messages.crlf_subject(), token), helo="nodot;dmarc=pass")
    state, delivered = account(pf, milter, token, out)
    assert state == "delivered" and delivered is not None
    head = delivered.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":", 1)[0].strip().lower() for line in re.split(rb"\r?\n(?![ \t])", head)]
    assert b"x-injected-cr" not in names and b"x-injected-word" not in names, names
    assert b"[SPAM]" in head and b"X-Spam-Flag: YES" in head
    (ours,) = our_authres(delivered)
    # The HELO's "; dmarc=pass" stays inside a quoted property value: one dmarc result, ours.
    from trustmilter.authresults import parse
    results = parse(ours).results
    assert [r.method for r in results].count("dmarc") == 1, ours
    assert 'smtp.helo="nodot;dmarc=pass"' in ours, ours


def test_pathological_regex_rule_stays_linear(setup: tuple[PostfixInstance, MilterProcess]
                                              ) -> None:
    """(a+)+$ against 200,000 a's and a '!': a backtracking engine would run for ages; RE2 is
    linear, so the milter answers within its normal time."""
    pf, milter = setup
    token = f"redos-{next(_nonce)}"
    body = (b"a" * 998 + b"\r\n") * 200 + b"a" * 500 + b"!\r\n"
    raw = messages.head("a" * 40 + "d") + b"Content-Type: text/plain\r\n\r\n" + body
    out = send_raw(pf, tagged(raw, token))
    assert out.seconds < 10, out
    state, _ = account(pf, milter, token, out)
    assert state == "delivered"
    entry = milter.message(out.queue_id or "")
    assert entry["eval_ms"] < 5000, entry
    assert "RULES_ERROR" not in entry.get("symbols", ""), entry
    # The rules are live (not refused at load): a subject they match fires one.
    token = f"redos-hit-{next(_nonce)}"
    out = send_raw(pf, tagged(messages.head("a" * 40 + "c") + b"\r\nbody\r\n", token))
    account(pf, milter, token, out)
    assert "HOSTILE_NESTED" in milter.message(out.queue_id or "")["symbols"]


def test_fifty_megabytes_is_not_lost(setup: tuple[PostfixInstance, MilterProcess]) -> None:
    """Above milter.max_message_bytes (25 MB default) the milter stops collecting the body and
    lets the message through unscanned (logged why=too-big): delivered whole, not refused."""
    pf, milter = setup
    token = f"big-{next(_nonce)}"
    raw = tagged(messages.big_message(), token)
    out = send_raw(pf, raw, timeout=180)
    assert out.code == 250, out
    entry = milter.message(out.queue_id or "", timeout=30)
    assert entry["action"] == "skip" and entry["why"] == "too-big", entry
    delivered = delivered_with(pf, token, timeout=120)
    assert delivered is not None, pf.queue()
    # Every byte arrived: the Maildir copy (LF line ends) ends with the whole message as sent,
    # after the headers Postfix puts in front (Return-Path, Delivered-To, Received).
    assert delivered.endswith(raw.replace(b"\r\n", b"\n")), len(delivered)


def test_service_security_facts(setup: tuple[PostfixInstance, MilterProcess]) -> None:
    """The socket has the configured mode; the state (history, reputation, quarantine index)
    is private; the log names the message but never its body."""
    import grp
    import pwd
    pf, milter = setup
    secret = f"BODY-TOKEN-{next(_nonce)}-d41d8cd98f00b204e9800998ecf8427e"
    token = f"log-{next(_nonce)}"
    raw = messages.head("quarterly") + b"Content-Type: text/plain\r\n\r\n" + \
        f"the code is {secret}\r\n".encode()
    out = send_raw(pf, tagged(raw, token))
    assert account(pf, milter, token, out)[0] == "delivered"
    milter.message(out.queue_id or "")

    sock = Path(milter.socket_path or "")
    info = sock.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == int(SOCKET_MODE, 8)
    assert info.st_uid == pwd.getpwnam("postfix").pw_uid
    assert info.st_gid == grp.getgrnam("postfix").gr_gid

    state = Path(milter.config["state"]["dir"])
    end = time.monotonic() + 15
    while time.monotonic() < end and not list(state.glob("*.sqlite")):
        time.sleep(0.2)   # the state writer creates its files off the SMTP path
    files = [p for p in state.iterdir() if p.is_file()]
    assert files, "the milter wrote no state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))

    log_text = milter.log_text()
    assert out.queue_id in log_text
    assert secret not in log_text
    for path in milter.workdir.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".txt"):
            assert secret.encode() not in path.read_bytes(), path


def test_reasons_in_replies_are_one_line(setup: tuple[PostfixInstance, MilterProcess]) -> None:
    """A rule reason with CR LF (YAML escapes) and a DMARC reject (the From domain in the
    reason): each sender sees one reply line, no injected reply or header."""
    pf, milter = setup
    token = f"reason-{next(_nonce)}"
    out = send_raw(pf, tagged(messages.head("trigger-reason-injection") + b"\r\nbody\r\n",
                              token))
    assert out.code == 550, out
    assert "\n" not in out.reply and "\r" not in out.reply, out
    assert out.reply.startswith("5.7.1 refused here X-Injected-Reply: yes 250 fake"), out
    token = f"dmarc-{next(_nonce)}"
    out = send_raw(pf, tagged(messages.forged_authres(), token))   # From: ceo@bank.test, p=reject
    assert out.code == 550 and "\n" not in out.reply and "bank.test" in out.reply, out
    since = len(milter.messages())
    end = time.monotonic() + 10
    while time.monotonic() < end:
        new = [e for e in milter.messages()[since - 1:] if e.get("action") == "reject"
               and "DMARC" in e.get("symbols", "")]
        if new:
            break
        time.sleep(0.1)
    assert new, milter.messages()[-3:]


def test_huge_txt_answers_through_postfix(setup: tuple[PostfixInstance, MilterProcess],
                                          dns: TestDNSServer) -> None:
    pf, milter = setup
    token = f"huge-{next(_nonce)}"
    before = len(dns.queries)
    raw = messages.head("huge", from_addr="boss@huge.test") + b"\r\nbody\r\n"
    out = send_raw(pf, tagged(raw, token), mail_from="boss@huge.test")
    assert out.seconds < 15, out
    state, delivered = account(pf, milter, token, out)
    asked = dns.queries[before:]
    assert ("huge.test", "TXT", "tcp") in asked and ("_dmarc.huge.test", "TXT", "tcp") in asked
    if delivered is not None:
        (ours,) = our_authres(delivered)
        assert "temperror" not in ours, ours
