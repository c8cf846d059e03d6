"""The rules engine on real parsed messages and real check outcomes (the typed outcomes the
authentication checks produce), through the loader as rule authors write rules."""
from __future__ import annotations

import base64
import time
from typing import Any

import pytest

from trustmilter.checks.base import CheckResult
from trustmilter.checks.outcomes import (ARCOutcome, DKIMOutcome, DKIMSignatureResult,
                                         DMARCOutcome, SPFOutcome)
from trustmilter.content.features import extract
from trustmilter.message import ParsedMessage
from trustmilter.rules.engine import Evaluation, dkim_status, strongest_action
from trustmilter.rules.loader import rule_set_from_sources
from trustmilter.types import Action, AuthStatus, Envelope, Symbol

HEAD = (b"Received: from mail.example.org (mail.example.org [45.140.17.9])\n"
        b"    by mx.example.net (Postfix) with ESMTPS id 1; Mon, 23 Nov 2026 10:00:05 +0000\n"
        b"From: Alice <alice@example.org>\nTo: bob@example.net\n"
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\nMessage-ID: <1@example.org>\n")


def msg(extra_headers: bytes = b"", body: bytes = b"Hello.\n") -> bytes:
    return HEAD + extra_headers + b"\n" + body


def hits(rules: str, raw: bytes, envelope: Envelope | None = None,
         results: dict[str, CheckResult] | None = None, now: float | None = None) -> list[str]:
    return [h.rule.name for h in evaluate(rules, raw, envelope, results, now)]


def evaluate(rules: str, raw: bytes, envelope: Envelope | None = None,
             results: dict[str, CheckResult] | None = None, now: float | None = None) -> list[Any]:
    rule_set = rule_set_from_sources({"t.yaml": rules}, {})
    parsed = ParsedMessage.parse(raw)
    ev = Evaluation(rule_set, parsed, envelope or Envelope(rcpt_to=("bob@example.net",)),
                    results or {}, lambda: extract(parsed), now=now)
    return rule_set.evaluate(ev)


def rule(name: str, match: str, score: float = 1.0, extra: str = "") -> str:
    return f"{name}:\n  description: test rule {name}\n  score: {score}\n{extra}  match: {match}\n"


# --- headers ------------------------------------------------------------------------------------
def test_header_regex_contains_equals_and_case() -> None:
    rules = (rule("R_REGEX", "{header: {name: Subject, regex: '^Win \\d+'}}")
             + rule("R_CONTAINS", "{header: {name: Subject, contains: 'prize'}}")
             + rule("R_CONTAINS_NOCASE", "{header: {name: Subject, contains: 'PRIZE', nocase: true}}")
             + rule("R_CONTAINS_CASE", "{header: {name: Subject, contains: 'PRIZE'}}")
             + rule("R_EQUALS", "{header: {name: subject, equals: 'Win 100 prizes'}}")
             + rule("R_EQUALS_PART", "{header: {name: Subject, equals: 'Win 100'}}"))
    got = hits(rules, msg(b"Subject: Win 100 prizes\n"))
    assert sorted(got) == ["R_CONTAINS", "R_CONTAINS_NOCASE", "R_EQUALS", "R_REGEX"]


def test_header_any_of_several_names_and_values() -> None:
    rules = rule("R", "{header: {name: [X-Mailer, User-Agent], contains: [Foo, Bar]}}")
    assert hits(rules, msg(b"User-Agent: Bar 1.0\n")) == ["R"]
    assert hits(rules, msg(b"X-Mailer: Baz\n")) == []


def test_header_exists_true_and_false() -> None:
    rules = (rule("HAS", "{header: {name: List-Id, exists: true}}")
             + rule("LACKS", "{header: {name: List-Id, exists: false}}"))
    assert hits(rules, msg(b"List-Id: <x.example.org>\n")) == ["HAS"]
    assert hits(rules, msg()) == ["LACKS"]


def test_header_values_are_rfc2047_decoded_unless_raw() -> None:
    rules = (rule("DECODED", "{header: {name: Subject, contains: 'Grüße'}}")
             + rule("RAW", "{header: {name: Subject, raw: true, contains: '=?utf-8?'}}"))
    assert sorted(hits(rules, msg(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"))) == ["DECODED", "RAW"]


def test_every_header_occurrence_is_tested() -> None:
    rules = rule("R", "{header: {name: Received, contains: 'evil.example'}}")
    raw = msg(b"Received: from evil.example (evil.example [198.51.100.1])\n")
    assert hits(rules, raw) == ["R"]


# --- body ---------------------------------------------------------------------------------------
HTML_MSG = msg(b"MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=b\n",
               b"--b\nContent-Type: text/plain\n\nplain words here\n"
               b"--b\nContent-Type: text/html\n\n<p>html words <span style=\"display:none\">"
               b"hidden words</span></p>\n--b--\n")


@pytest.mark.parametrize("part,word,expected", [
    ("plain", "plain words", True), ("plain", "html words", False),
    ("html", "html words", True), ("html", "hidden words", False),
    ("hidden", "hidden words", True), ("all", "hidden words", True),
    ("all", "plain words", True), ("text", "plain words", True),
])
def test_body_parts(part: str, word: str, expected: bool) -> None:
    rules = rule("R", f"{{body: {{part: {part}, contains: '{word}'}}}}")
    assert (hits(rules, HTML_MSG) == ["R"]) is expected


def test_body_is_decoded_from_base64_and_quoted_printable() -> None:
    b64 = base64.b64encode("Prüfung bestanden".encode()).decode()
    raw = msg(f"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
              f"Content-Transfer-Encoding: base64\n".encode(), b64.encode() + b"\n")
    assert hits(rule("R", "{body: {contains: 'Prüfung'}}"), raw) == ["R"]
    qp = msg(b"MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
             b"Content-Transfer-Encoding: quoted-printable\n", b"Pr=FCfung\n")
    assert hits(rule("R", "{body: {contains: 'Prüfung'}}"), qp) == ["R"]


def test_body_min_count_counts_matches() -> None:
    rules = rule("R", "{body: {regex: 'free', min_count: 3}}")
    assert hits(rules, msg(body=b"free free\n")) == []
    assert hits(rules, msg(body=b"free free free\n")) == ["R"]


def test_unicode_case_folding_and_classes() -> None:
    rules = rule("R", "{body: {regex: '\\bstraße\\b', nocase: true}}")
    assert hits(rules, msg(b"Content-Type: text/plain; charset=utf-8\n",
                           "STRASSE and STRAßE".encode())) == ["R"]
    caps = rule("CAPS", "{header: {name: Subject, regex: '\\A[^\\p{Ll}]+\\z'}}")
    assert hits(caps, msg(b"Subject: =?utf-8?q?=C3=89T=C3=89?=\n")) == ["CAPS"]
    assert hits(caps, msg(b"Subject: =?utf-8?q?=C3=A9t=C3=A9?=\n")) == []


def test_re2_is_linear_on_a_pattern_that_hangs_backtracking_engines() -> None:
    rules = rule("R", "{body: {regex: '(a+)+$'}}")
    raw = msg(body=b"a" * 30000 + b"!\n")
    started = time.perf_counter()
    assert hits(rules, raw) == []
    # Python's re needs longer than the age of the universe here; RE2 answers in milliseconds.
    assert time.perf_counter() - started < 2.0


# --- links and attachments ----------------------------------------------------------------------
LINKS = msg(b"MIME-Version: 1.0\nContent-Type: text/html\n",
            b'<a href="https://evil-login.top/x">https://www.paypal.com/</a>'
            b'<a href="http://198.51.100.7/a">here</a> <a href="https://bit.ly/abc">short</a>'
            b'<a href="https://xn--pypal-4ve.com/">idn</a>'
            b'<a href="http://paypal.com@evil-login.top/">at</a>'
            b'<a href="https://paypal.com.secure-id.top/">sub</a>\n')


@pytest.mark.parametrize("spec,expected", [
    ("{text_mismatch: true}", True),
    ("{ip: true}", True),
    ("{domain: [bit.ly, tinyurl.com]}", True),
    ("{domain: [example.com]}", False),
    ("{idn: true}", True),
    ("{userinfo: true}", True),
    ("{lookalike: true}", True),
    ("{lookalike: true, not_domain: [secure-id.top]}", False),
    ("{host: {regex: '^paypal\\.com\\.'}}", True),
    ("{url: {contains: '/a'}, ip: true}", True),
    ("{url: {contains: '/x'}, ip: true}", False),   # one link must satisfy all predicates
    ("{scheme: [https], min_count: 4}", True),
    ("{scheme: [https], min_count: 5}", False),
    ("{text: {equals: short}, domain: bit.ly}", True),
])
def test_url_predicates(spec: str, expected: bool) -> None:
    assert (hits(rule("R", f"{{url: {spec}}}"), LINKS) == ["R"]) is expected


def attachment_msg(filename: str, ctype: str, payload: bytes = b"AAAA") -> bytes:
    return msg(b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n",
               b"--b\nContent-Type: text/plain\n\nsee attached\n--b\n"
               + f'Content-Type: {ctype}; name="{filename}"\n'
                 f'Content-Disposition: attachment; filename="{filename}"\n'
                 f"Content-Transfer-Encoding: base64\n\n".encode()
               + base64.b64encode(payload) + b"\n--b--\n")


def test_attachment_ext_type_name_size() -> None:
    raw = attachment_msg("Invoice.PDF.exe", "application/octet-stream", b"x" * 100)
    assert hits(rule("R", "{attachment: {ext: [exe]}}"), raw) == ["R"]
    assert hits(rule("R", "{attachment: {ext: [.EXE]}}"), raw) == ["R"]
    assert hits(rule("R", "{attachment: {content_type: 'application/*'}}"), raw) == ["R"]
    assert hits(rule("R", "{attachment: {content_type: image/png}}"), raw) == []
    assert hits(rule("R", "{attachment: {name: {regex: '\\.pdf\\.exe$', nocase: true}}}"), raw) == ["R"]
    assert hits(rule("R", "{attachment: {size: {min: 50, max: 200}}}"), raw) == ["R"]
    assert hits(rule("R", "{attachment: {size: {min: 101}}}"), raw) == []


# --- envelope -----------------------------------------------------------------------------------
def test_client_ip_networks_v4_v6_and_mapped() -> None:
    rules = rule("R", "{client_ip: ['198.51.100.0/24', '2001:db8::/32']}")
    assert hits(rules, msg(), Envelope(client_ip="198.51.100.9")) == ["R"]
    assert hits(rules, msg(), Envelope(client_ip="::ffff:198.51.100.9")) == ["R"]
    assert hits(rules, msg(), Envelope(client_ip="2001:db8::5")) == ["R"]
    assert hits(rules, msg(), Envelope(client_ip="203.0.113.1")) == []
    assert hits(rules, msg(), Envelope(client_ip=None)) == []


def test_helo_mail_from_rcpt_count_authenticated() -> None:
    env = Envelope(helo="ylmf-pc", mail_from="", rcpt_to=("a@x.org", "b@x.org", "c@x.org"),
                   auth_user=None)
    assert hits(rule("R", "{helo: {equals: ylmf-pc}}"), msg(), env) == ["R"]
    assert hits(rule("R", "{mail_from: {equals: ''}}"), msg(), env) == ["R"]   # null sender
    assert hits(rule("R", "{rcpt_count: {min: 3}}"), msg(), env) == ["R"]
    assert hits(rule("R", "{rcpt_count: {max: 2}}"), msg(), env) == []
    assert hits(rule("R", "{authenticated: false}"), msg(), env) == ["R"]


# --- authentication results and symbols ---------------------------------------------------------
def auth_results(spf: AuthStatus = AuthStatus.PASS, dkim: tuple[AuthStatus, ...] = (),
                 dmarc: AuthStatus = AuthStatus.PASS, dkim_aligned: bool = True,
                 symbols: tuple[str, ...] = ()) -> dict[str, CheckResult]:
    sigs = tuple(DKIMSignatureResult(s, "example.org", "s1", "abcdefgh", "rsa-sha256")
                 for s in dkim)
    return {
        "spf": CheckResult(outcome=SPFOutcome(spf, "example.org")),
        "dkim": CheckResult(outcome=DKIMOutcome(sigs)),
        "arc": CheckResult(outcome=ARCOutcome(AuthStatus.NONE)),
        "dmarc": CheckResult(outcome=DMARCOutcome(dmarc, "example.org", "example.org", "reject",
                                                  "reject", spf_aligned=True,
                                                  dkim_aligned=dkim_aligned)),
        "dnsbl": CheckResult(symbols=[Symbol(s, 1.0) for s in symbols]),
    }


def test_dkim_status_summary() -> None:
    def status(*s: AuthStatus) -> AuthStatus:
        return dkim_status(DKIMOutcome(tuple(DKIMSignatureResult(x, "d", "s", "b", "a") for x in s)))
    assert status() is AuthStatus.NONE
    assert status(AuthStatus.FAIL, AuthStatus.PASS) is AuthStatus.PASS
    assert status(AuthStatus.FAIL, AuthStatus.TEMPERROR) is AuthStatus.TEMPERROR
    assert status(AuthStatus.PERMERROR, AuthStatus.FAIL) is AuthStatus.FAIL
    assert status(AuthStatus.PERMERROR) is AuthStatus.PERMERROR


@pytest.mark.parametrize("spec,results,expected", [
    ("{spf: pass}", auth_results(), True),
    ("{spf: [fail, softfail]}", auth_results(spf=AuthStatus.SOFTFAIL), True),
    ("{spf: fail, dkim: none}", auth_results(spf=AuthStatus.FAIL), True),
    ("{spf: fail, dkim: none}", auth_results(spf=AuthStatus.FAIL, dkim=(AuthStatus.PASS,)), False),
    ("{dkim: pass, dkim_domain: example.org}", auth_results(dkim=(AuthStatus.PASS,)), True),
    ("{dkim_domain: other.org}", auth_results(dkim=(AuthStatus.PASS,)), False),
    ("{dmarc: pass, dkim_aligned: true}", auth_results(), True),
    ("{dmarc: pass, dkim_aligned: true}", auth_results(dkim_aligned=False), False),
    ("{dmarc_policy: reject}", auth_results(), True),
    ("{arc: none}", auth_results(), True),
    ("{spf: none}", {}, False),    # SPF did not run: nothing matches
])
def test_auth_conditions(spec: str, results: dict[str, CheckResult], expected: bool) -> None:
    assert (hits(rule("R", f"{{auth: {spec}}}"), msg(), results=results) == ["R"]) is expected


def test_symbols_exact_prefix_and_rule_references() -> None:
    rules = (rule("LISTED", "{symbol: [RBL_*]}")
             + rule("EXACT", "{symbol: RBL_SPAMCOP}")
             + rule("META", "{all: [{symbol: LISTED}, {symbol: EXACT}]}", score=2)
             + rule("META_NOT", "{not: {symbol: META}}"))
    got = hits(rules, msg(), results=auth_results(symbols=("RBL_SPAMCOP",)))
    assert got == ["LISTED", "EXACT", "META"]
    assert hits(rules, msg(), results=auth_results()) == ["META_NOT"]


def test_rule_referenced_many_times_is_evaluated_once() -> None:
    calls = []
    rules = (rule("BASE", "{body: {contains: Hello}}")
             + "".join(rule(f"USE_{i}", "{symbol: BASE}") for i in range(5)))
    rule_set = rule_set_from_sources({"t.yaml": rules}, {})
    base = rule_set.by_name["BASE"].condition
    original = base.test
    base.test = lambda ev: calls.append(1) or original(ev)   # type: ignore[method-assign]
    parsed = ParsedMessage.parse(msg())
    ev = Evaluation(rule_set, parsed, Envelope(), {}, lambda: extract(parsed))
    assert len(rule_set.evaluate(ev)) == 6
    assert len(calls) == 1


# --- combinators, notes, laziness ---------------------------------------------------------------
def test_all_any_not_nesting() -> None:
    rules = rule("R", "{all: [{any: [{header: {name: Subject, contains: a}}, "
                      "{header: {name: Subject, contains: b}}]}, "
                      "{not: {body: {contains: ham}}}]}")
    assert hits(rules, msg(b"Subject: b\n", b"spam\n")) == ["R"]
    assert hits(rules, msg(b"Subject: b\n", b"ham\n")) == []
    assert hits(rules, msg(b"Subject: c\n", b"spam\n")) == []


def test_reason_names_what_matched_and_not_what_was_negated() -> None:
    rules = rule("R", "{all: [{body: {contains: invoice}}, {not: {header: {name: X-Ok, exists: true}}}]}")
    (hit,) = evaluate(rules, msg(body=b"your invoice\n"))
    assert hit.reason == "test rule R (body 'invoice')"


def test_cheap_conditions_short_circuit_body_decoding() -> None:
    rules = rule("R", "{all: [{body: {contains: x}}, {header: {name: X-Never, exists: true}}]}")
    rule_set = rule_set_from_sources({"t.yaml": rules}, {})
    parsed = ParsedMessage.parse(msg())
    asked = []
    ev = Evaluation(rule_set, parsed, Envelope(), {}, lambda: asked.append(1) or extract(parsed))
    assert rule_set.evaluate(ev) == []
    assert asked == []   # the header test failed first: the body was never decoded


# --- date and message facts ---------------------------------------------------------------------
def test_date_relative_to_newest_received_header() -> None:
    future = (rule("FUT", "{date: {future_hours: 24}}") + rule("PAST", "{date: {past_hours: 96}}")
              + rule("MISSING", "{date: {missing: true}}") + rule("BAD", "{date: {invalid: true}}"))
    head = HEAD.replace(b"Date: Mon, 23 Nov 2026 10:00:00 +0000\n", b"")
    assert hits(future, head + b"Date: Thu, 26 Nov 2026 10:00:00 +0000\n\nx\n") == ["FUT"]
    assert hits(future, head + b"Date: Wed, 18 Nov 2026 10:00:00 +0000\n\nx\n") == ["PAST"]
    assert hits(future, head + b"Date: Sun, 22 Nov 2026 10:00:00 +0000\n\nx\n") == []
    assert hits(future, head + b"\nx\n") == ["MISSING"]
    assert hits(future, head + b"Date: not a date\n\nx\n") == ["BAD"]


def test_date_without_received_uses_the_reference_time() -> None:
    rules = rule("FUT", "{date: {future_hours: 24}}")
    raw = b"From: a@example.org\nDate: Mon, 23 Nov 2026 10:00:00 +0000\n\nx\n"
    dated = 1795428000.0   # Mon, 23 Nov 2026 10:00:00 +0000
    assert hits(rules, raw, now=dated + 3600) == []
    assert hits(rules, raw, now=dated - 10 * 86400) == ["FUT"]
    # The evaluation is pure in its inputs: same message, same reference time, same answer.
    assert hits(rules, raw, now=dated - 10 * 86400) == ["FUT"]


def test_message_facts() -> None:
    html_only = msg(b"MIME-Version: 1.0\nContent-Type: text/html\n",
                    b'<a href="https://x.example.com/"><img src="https://x.example.com/i.png"></a>\n')
    rules = (rule("TINY", "{message: {html_only: true, text_chars: {max: 10}, images: 1}}")
             + rule("LINKS", "{message: {links: {min: 1}, attachments: 0}}"))
    assert hits(rules, html_only) == ["TINY", "LINKS"]
    assert hits(rules, msg()) == []


# --- from / reply-to ----------------------------------------------------------------------------
def test_from_and_reply_to() -> None:
    spoof = msg(b"", b"x\n").replace(b"From: Alice <alice@example.org>",
                                     b'From: "support@paypal.com" <x@paypa1.com>')
    assert hits(rule("R", "{from: {name_has_other_domain: true}}"), spoof) == ["R"]
    assert hits(rule("R", "{from: {lookalike: true}}"), spoof) == ["R"]
    assert hits(rule("R", "{from: {lookalike: true}}"), msg()) == []
    assert hits(rule("R", "{from: {domain: example.org}}"), msg()) == ["R"]
    assert hits(rule("R", "{from: {is_recipient: true}}"), msg(),
                Envelope(rcpt_to=("Alice@Example.org",))) == ["R"]
    reply = msg(b"Reply-To: boss.private@gmail.com\n")
    assert hits(rule("R", "{reply_to: {freemail: true, differs_from_from: true}}"), reply) == ["R"]
    assert hits(rule("R", "{reply_to: {freemail: true}}"), msg()) == []


# --- actions ------------------------------------------------------------------------------------
def test_strongest_forced_action_wins() -> None:
    rules = (rule("J", "{body: {contains: x}}", extra="  action: junk\n")
             + rule("RJ", "{body: {contains: x}}", extra="  action: reject\n  reason: refused\n")
             + rule("Q", "{body: {contains: x}}", extra="  action: quarantine\n"))
    found = evaluate(rules, msg(body=b"x\n"))
    best = strongest_action(found)
    assert best is not None and best.rule.name == "RJ" and best.rule.action is Action.REJECT
