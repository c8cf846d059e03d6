"""Rule evaluation: compiled conditions tested against one message, lazily and purely.

The loader turns YAML into the objects below once (regexes compiled with RE2, lists into sets,
children of ``all``/``any`` ordered cheapest first); per message there is no YAML work. A
condition reads the message through an ``Evaluation``, which computes each view (decoded
headers, body text as UTF-8 bytes, content features, symbols of the other checks) the first
time a condition asks for it. ``all`` and ``any`` stop at the first child that decides them, so
a rule whose cheap condition fails never decodes the body.

Everything here is deterministic: the same message, envelope, check results and reference time
give the same hits. Regular expressions are RE2 (linear time in the text, bounded memory), so no
pattern can hang the milter.
"""
from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
import time
from dataclasses import dataclass, field
from datetime import timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import re2

from trustmilter.message import decode_words
from trustmilter.received import parse_ip
from trustmilter.types import Action, AuthStatus, Envelope

if TYPE_CHECKING:
    from trustmilter.checks.base import CheckResult
    from trustmilter.checks.outcomes import DKIMOutcome
    from trustmilter.content.features import Attachment, Link, MessageFeatures
    from trustmilter.message import Header as MessageHeader, ParsedMessage

# Longest text a note (why a rule fired) quotes from the message.
_NOTE_CHARS = 60

# Imported on first use, not at module load: trustmilter.checks imports the rules check, which
# imports this module. Kept here because an import statement inside a test costs about a
# microsecond each time, and conditions run tens of times per message.
_OUTCOMES: tuple[type, type, type, type] | None = None
_FEATURES: Any = None


def _outcome_types() -> tuple[type, type, type, type]:
    """(ARCOutcome, DKIMOutcome, DMARCOutcome, SPFOutcome)."""
    global _OUTCOMES
    if _OUTCOMES is None:
        from trustmilter.checks.outcomes import ARCOutcome, DKIMOutcome, DMARCOutcome, SPFOutcome
        _OUTCOMES = (ARCOutcome, DKIMOutcome, DMARCOutcome, SPFOutcome)
    return _OUTCOMES


def _features_module() -> Any:
    """trustmilter.content.features (FREEMAIL, brands, registered domains)."""
    global _FEATURES
    if _FEATURES is None:
        import trustmilter.content.features as module
        _FEATURES = module
    return _FEATURES


def _snippet(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    return text if len(text) <= _NOTE_CHARS else text[:_NOTE_CHARS - 3] + "..."


def _encode(text: str) -> bytes:
    """UTF-8 for RE2; header bytes kept by surrogateescape come back as they arrived."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Matching text
# ---------------------------------------------------------------------------------------------
# The binding's RE2 object and anchor, when this google-re2 has them (1.1 does): one call to
# RE2::Match per search instead of the wrapper's generator and match object (about half the
# cost of a search on a header-sized text).
_UNANCHORED: Any = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)


def _raw_match(pattern: Any) -> Callable[..., Any] | None:
    regexp = getattr(pattern, "_regexp", None)
    match = getattr(regexp, "Match", None)
    return match if callable(match) and _UNANCHORED is not None else None


class Matcher:
    """One RE2 pattern built from a spec's ``regex``/``contains``/``equals`` alternatives (any
    of them matches), matched against UTF-8 bytes. ``min_count`` asks for that many
    non-overlapping matches in one text.

    ``literals``: the UTF-8 of
    the ``contains`` strings when the spec is nothing else and is case-sensitive; then the
    pattern is an alternation of those strings, and a byte search finds the same first match
    (leftmost, the earlier alternative at a tie, as RE2 does) several times faster."""

    __slots__ = ("pattern", "min_count", "source", "literals", "_match")

    def __init__(self, pattern: Any, min_count: int, source: str,
                 literals: tuple[bytes, ...] | None = None) -> None:
        self.pattern = pattern
        self.min_count = min_count
        self.source = source
        self.literals = literals if literals and all(literals) else None
        self._match = _raw_match(pattern)

    def find(self, data: bytes) -> str | None:
        """A short quote of the first match, or None when the text does not match enough."""
        literals = self.literals
        if literals is not None:
            if self.min_count <= 1:
                first, found = -1, b""
                for literal in literals:
                    at = data.find(literal)
                    if at >= 0 and (first < 0 or at < first):
                        first, found = at, literal
                return None if first < 0 else _snippet(found)
            if len(literals) == 1:   # non-overlapping occurrences, as RE2's finditer counts
                literal = literals[0]
                return _snippet(literal) if data.count(literal) >= self.min_count else None
        if self.min_count <= 1:
            if self._match is not None:
                start, end = self._match(_UNANCHORED, data, 0, len(data))[0]
                return None if start < 0 else _snippet(data[start:end])
            match = self.pattern.search(data)
            return None if match is None else _snippet(match.group(0))
        first: str | None = None
        count = 0
        for match in self.pattern.finditer(data):
            if first is None:
                first = _snippet(match.group(0))
            count += 1
            if count >= self.min_count:
                return first
        return None

    def find_text(self, text: str) -> str | None:
        return self.find(_encode(text))


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range; either end may be open."""

    min: float | None = None
    max: float | None = None

    def __contains__(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}..{self.max:g}"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


# ---------------------------------------------------------------------------------------------
# Many patterns over one text
# ---------------------------------------------------------------------------------------------
# A body part read by at least this many RE2-searched patterns gets a PatternSet. On the test
# split the shipped rules' 15 patterns on "text" take ~12 us/msg as one set against ~75 us one
# by one in a tight loop (inside the pipeline, with cold caches, the rules check drops 25-40
# us/msg); a set of one or two patterns is slower than searching them.
SET_MIN_PATTERNS = 3
_NOT_RUN: Any = object()
# Options the loader may give a pattern that the set reproduces (case folding inline); a
# pattern compiled with any other option different from RE2's default stays out of sets.
_SET_OPTIONS_FREE = frozenset({"case_sensitive", "never_capture", "max_mem", "log_errors"})


def _set_compatible(pattern: Any) -> bool:
    try:
        options, default = pattern.options, re2.Options()
        return all(getattr(options, name) == getattr(default, name)
                   for name in re2.Options.NAMES if name not in _SET_OPTIONS_FREE)
    except AttributeError:
        return False


class PatternSet:
    """The patterns of the ``body`` conditions that read one part, as one RE2::Set: a single
    pass over the text tells which of them occur anywhere in it. A condition whose pattern is
    not among them cannot match and is decided without a search; the others search as before
    (for the quote and ``min_count``), so results are the same as without the set.

    Linear time like any RE2 match. RE2::Set has no fallback when its DFA runs out of memory
    (it then reports no match at all): pattern 0 matches every text, so an answer without it
    means "unknown" and every condition searches on its own."""

    def __init__(self, part: str, matchers: Sequence[Matcher], max_mem: int) -> None:
        self.part = part
        options = re2.Options()
        options.log_errors = False
        options.never_capture = True
        options.max_mem = max_mem
        regex_set = re2.Set.SearchSet(options)
        regex_set.Add(b"")                 # the always-matching witness, index 0
        for matcher in matchers:
            source = matcher.pattern.pattern
            if isinstance(source, str):
                source = source.encode("utf-8")
            # The same pattern under the same flags: case folding inline, as it was compiled.
            nocase = not matcher.pattern.options.case_sensitive
            regex_set.Add((b"(?i:" if nocase else b"(?:") + source + b")")
        regex_set.Compile()
        self._set = regex_set

    def match(self, data: bytes) -> frozenset[int] | None:
        """Indexes (from 1, in the order given) of the patterns that occur in ``data``; None
        when the set could not tell."""
        found = self._set.Match(data)
        if not found or 0 not in found:
            return None
        return frozenset(found)


def build_pattern_sets(conditions: Iterable["Condition"], max_mem_each: int) -> list[PatternSet]:
    """Give every ``body`` condition among ``conditions`` whose part has enough RE2-searched
    patterns its slot in that part's PatternSet (``max_mem_each`` per pattern, the memory the
    patterns would have had one by one). A set RE2 cannot build leaves its conditions
    searching on their own."""
    by_part: dict[str, list[Body]] = {}
    for condition in conditions:
        if isinstance(condition, Body):
            condition.slot = None
            matcher = condition.matcher
            if matcher.literals is None and _set_compatible(matcher.pattern):
                by_part.setdefault(condition.part, []).append(condition)
    sets = []
    for part, bodies in by_part.items():
        if len(bodies) < SET_MIN_PATTERNS:
            continue
        try:
            pattern_set = PatternSet(part, [b.matcher for b in bodies],
                                     max_mem_each * len(bodies))
        except re2.error:
            continue
        for index, body in enumerate(bodies, start=1):
            body.slot = (pattern_set, index)
        sets.append(pattern_set)
    return sets


# ---------------------------------------------------------------------------------------------
# The per-message view
# ---------------------------------------------------------------------------------------------
BODY_PARTS = ("text", "all", "plain", "html", "hidden")


class Evaluation:
    """One message as the rules see it. Views are computed on first use and kept."""

    def __init__(self, rule_set: "RuleSet", message: "ParsedMessage", envelope: Envelope,
                 results: Mapping[str, "CheckResult"],
                 features: Callable[[], "MessageFeatures"], now: float | None = None) -> None:
        self.rule_set = rule_set
        self.message = message
        self.envelope = envelope
        self.results = results
        self._features_factory = features
        self._features: MessageFeatures | None = None
        # Headers by lower-case name, built once; values are unfolded (and RFC 2047 decoded,
        # and UTF-8 encoded for RE2) only for the names some rule asks about.
        self._by_name: dict[str, list[MessageHeader]] | None = None
        self._values: dict[tuple[str, bool], list[str]] = {}
        self._data: dict[tuple[str, bool], list[bytes]] = {}
        self._text: dict[str, bytes] = {}
        self._set_hits: dict[PatternSet, frozenset[int] | None] = {}
        self._symbols: frozenset[str] | None = None
        self._sorted_symbols: list[str] | None = None
        self._reference_time: float | None = None
        self._now = now
        self.memo: dict[str, bool] = {}      # rule name -> fired (for rules naming rules)
        self.rule_notes: dict[str, list[str]] = {}   # rule name -> why it fired
        self.notes: list[str] = []           # why the rule being evaluated matched
        self._facts: dict[str, Any] = {}     # MessageFacts, each computed once

    # views ------------------------------------------------------------------------------------
    @property
    def features(self) -> "MessageFeatures":
        if self._features is None:
            self._features = self._features_factory()
        return self._features

    def _headers_named(self, lname: str) -> list["MessageHeader"]:
        by_name = self._by_name
        if by_name is None:
            by_name = self._by_name = {}
            for h in self.message.headers:
                name = h.name.lower()
                found = by_name.get(name)
                if found is None:
                    by_name[name] = [h]
                else:
                    found.append(h)
        return by_name.get(lname, [])

    def header_values(self, lname: str, raw: bool) -> list[str]:
        """Every value of header ``lname``, in message order: unfolded (``raw``), or also RFC
        2047 decoded."""
        key = (lname, raw)
        values = self._values.get(key)
        if values is None:
            headers = self._headers_named(lname)
            values = [h.value for h in headers] if raw else [decode_words(h.value)
                                                             for h in headers]
            self._values[key] = values
        return values

    def header_data(self, lname: str, raw: bool) -> list[bytes]:
        """``header_values`` as the UTF-8 bytes RE2 matches."""
        key = (lname, raw)
        data = self._data.get(key)
        if data is None:
            data = self._data[key] = [_encode(v) for v in self.header_values(lname, raw)]
        return data

    def has_header(self, lname: str) -> bool:
        return bool(self._headers_named(lname))

    def text(self, part: str) -> bytes:
        data = self._text.get(part)
        if data is None:
            f = self.features
            if part == "text":
                value = f.text
            elif part == "plain":
                value = f.text_plain
            elif part == "html":
                value = f.html_text
            elif part == "hidden":
                value = f.hidden_text
            else:  # "all": every decoded text, visible or not
                value = "\n".join(t for t in (f.text_plain, f.html_text, f.hidden_text) if t)
            data = self._text[part] = _encode(value)
        return data

    def may_match(self, slot: tuple["PatternSet", int]) -> bool:
        """False when pattern ``slot[1]`` of set ``slot[0]`` occurs nowhere in that set's body
        part (one pass of the set over the text answers for all its patterns)."""
        pattern_set, index = slot
        hits = self._set_hits.get(pattern_set, _NOT_RUN)
        if hits is _NOT_RUN:
            hits = self._set_hits[pattern_set] = pattern_set.match(self.text(pattern_set.part))
        return hits is None or index in hits

    @property
    def symbols(self) -> frozenset[str]:
        if self._symbols is None:
            self._symbols = frozenset(s.name for r in self.results.values() for s in r.symbols)
        return self._symbols

    @property
    def sorted_symbols(self) -> list[str]:
        if self._sorted_symbols is None:
            self._sorted_symbols = sorted(self.symbols)
        return self._sorted_symbols

    def outcome(self, check: str, kind: type) -> Any:
        result = self.results.get(check)
        outcome = getattr(result, "outcome", None)
        return outcome if isinstance(outcome, kind) else None

    @property
    def now(self) -> float:
        if self._now is None:
            self._now = time.time()
        return self._now

    def fact(self, name: str) -> Any:
        """A ``message`` fact (see MESSAGE_FACTS_*), computed on first use."""
        facts = self._facts
        if name in facts:
            return facts[name]
        value = facts[name] = _FACT_GETTERS[name](self.features, self.message)
        return value

    def note(self, text: str) -> None:
        if len(self.notes) < 8:
            self.notes.append(text)


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------
class Condition:
    """A test on one message. ``cost`` orders siblings (cheap first); results never depend on
    the order because conditions are pure."""

    cost = 1

    def test(self, ev: Evaluation) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def rule_refs(self) -> Iterable[str]:
        return ()


class All(Condition):
    def __init__(self, children: Sequence[Condition]) -> None:
        self.children = tuple(sorted(children, key=lambda c: c.cost))
        self.cost = sum(c.cost for c in self.children)

    def test(self, ev: Evaluation) -> bool:
        mark = len(ev.notes)
        for child in self.children:
            if not child.test(ev):
                del ev.notes[mark:]
                return False
        return True

    def rule_refs(self) -> Iterable[str]:
        for child in self.children:
            yield from child.rule_refs()


class Any_(Condition):
    def __init__(self, children: Sequence[Condition]) -> None:
        self.children = tuple(sorted(children, key=lambda c: c.cost))
        self.cost = max((c.cost for c in self.children), default=1)

    def test(self, ev: Evaluation) -> bool:
        return any(child.test(ev) for child in self.children)

    def rule_refs(self) -> Iterable[str]:
        for child in self.children:
            yield from child.rule_refs()


class Not(Condition):
    def __init__(self, child: Condition) -> None:
        self.child = child
        self.cost = child.cost

    def test(self, ev: Evaluation) -> bool:
        mark = len(ev.notes)
        fired = self.child.test(ev)
        del ev.notes[mark:]   # what matched inside a "not" is not why the rule fired
        return not fired

    def rule_refs(self) -> Iterable[str]:
        return self.child.rule_refs()


class Header(Condition):
    """Headers by name (any of several). With a matcher: some value of some named header
    matches (decoded RFC 2047 words unless ``raw``). With ``exists`` alone: presence."""

    cost = 2

    def __init__(self, names: Sequence[str], matcher: Matcher | None, exists: bool | None,
                 raw: bool) -> None:
        self.names = tuple(n.lower() for n in names)
        self.matcher = matcher
        self.exists = exists
        self.raw = raw

    def test(self, ev: Evaluation) -> bool:
        if self.matcher is None:
            present = any(ev.has_header(n) for n in self.names)
            if present == bool(self.exists):
                if present:
                    ev.note(f"header {self.names[0]} present")
                return True
            return False
        for name in self.names:
            for data in ev.header_data(name, self.raw):
                hit = self.matcher.find(data)
                if hit is not None:
                    ev.note(f"{name}: {hit!r}")
                    return True
        return False


class Body(Condition):
    cost = 8

    def __init__(self, part: str, matcher: Matcher) -> None:
        self.part = part
        self.matcher = matcher
        # (the RE2 set of this part's patterns, this pattern's index in it): see PatternSet.
        self.slot: tuple[PatternSet, int] | None = None

    def test(self, ev: Evaluation) -> bool:
        if self.slot is not None and not ev.may_match(self.slot):
            return False
        hit = self.matcher.find(ev.text(self.part))
        if hit is None:
            return False
        ev.note(f"body {hit!r}")
        return True


@dataclass
class LinkTest:
    """Predicates on one link; every one given must hold."""

    url: Matcher | None = None
    host: Matcher | None = None
    text: Matcher | None = None
    domains: frozenset[str] = frozenset()
    not_domains: frozenset[str] = frozenset()
    schemes: frozenset[str] = frozenset()
    ip: bool | None = None
    idn: bool | None = None
    userinfo: bool | None = None
    port: bool | None = None
    text_mismatch: bool | None = None
    lookalike: bool | None = None
    in_html: bool | None = None

    def matches(self, link: "Link") -> bool:
        if self.ip is not None and link.is_ip != self.ip:
            return False
        if self.idn is not None and link.idn != self.idn:
            return False
        if self.userinfo is not None and link.has_userinfo != self.userinfo:
            return False
        if self.port is not None and link.port != self.port:
            return False
        if self.in_html is not None and link.in_html != self.in_html:
            return False
        if self.text_mismatch is not None and link.mismatched != self.text_mismatch:
            return False
        if self.schemes and link.scheme not in self.schemes:
            return False
        if self.domains and not _domain_in(link.host, link.domain, self.domains):
            return False
        if self.not_domains and _domain_in(link.host, link.domain, self.not_domains):
            return False
        if self.lookalike is not None and _is_lookalike(link.host, link.domain) != self.lookalike:
            return False
        if self.url is not None and self.url.find_text(link.url) is None:
            return False
        if self.host is not None and self.host.find_text(link.host) is None:
            return False
        if self.text is not None and self.text.find_text(link.text) is None:
            return False
        return True


def _domain_in(host: str, registered: str, domains: frozenset[str]) -> bool:
    """``host`` is one of ``domains`` or below one of them."""
    if registered in domains or host in domains:
        return True
    # Each parent of host that still has two labels (what host.split(".")[i:] joined gives for
    # i >= 1), found by slicing after each dot instead of splitting and joining.
    dot = host.find(".")
    while dot >= 0:
        parent = host[dot + 1:]
        below = parent.find(".")
        if below < 0:
            return False
        if parent in domains:
            return True
        dot += 1 + below
    return False


def imitated_brand(registered: str) -> str:
    """The brand a registered domain imitates, or "". A brand's name on another public suffix
    (google.de, amazon.fr) is the brand's own country domain, not an imitation."""
    brand = _features_module().lookalike_brand(registered) if registered else ""
    return "" if brand and registered.split(".", 1)[0] == brand else brand


def _is_lookalike(host: str, registered: str) -> bool:
    return bool(imitated_brand(registered)
                or _features_module().brand_in_subdomain(host, registered))


class Url(Condition):
    """Links in the body (plain-text URLs and HTML hrefs): at least ``min_count`` satisfy
    every given predicate."""

    cost = 6

    def __init__(self, link_test: LinkTest, min_count: int) -> None:
        self.link_test = link_test
        self.min_count = min_count

    def test(self, ev: Evaluation) -> bool:
        count = 0
        for link in ev.features.links:
            if self.link_test.matches(link):
                count += 1
                if count >= self.min_count:
                    ev.note(f"link {_snippet(link.url)!r}")
                    return True
        return False


class Attachment_(Condition):
    cost = 5

    def __init__(self, name: Matcher | None, exts: frozenset[str], types: frozenset[str],
                 type_prefixes: tuple[str, ...], size: Range | None, min_count: int) -> None:
        self.name = name
        self.exts = exts
        self.types = types
        self.type_prefixes = type_prefixes
        self.size = size
        self.min_count = min_count

    def _matches(self, att: "Attachment") -> bool:
        if self.exts and att.ext.lower() not in self.exts:
            return False
        if self.types or self.type_prefixes:
            ctype = att.content_type.lower()
            if ctype not in self.types and not ctype.startswith(self.type_prefixes or ("\0",)):
                return False
        if self.size is not None and att.size not in self.size:
            return False
        if self.name is not None and self.name.find_text(att.filename) is None:
            return False
        return True

    def test(self, ev: Evaluation) -> bool:
        count = 0
        for att in ev.features.attachments:
            if self._matches(att):
                count += 1
                if count >= self.min_count:
                    ev.note(f"attachment {_snippet(att.filename or att.content_type)!r}")
                    return True
        return False


class ClientIP(Condition):
    def __init__(self, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)

    def test(self, ev: Evaluation) -> bool:
        ip = ev.envelope.client_ip
        addr = parse_ip(ip)
        if addr is None:
            return False
        for net in self.networks:
            if addr.version == net.version and addr in net:
                ev.note(f"client {ip} in {net}")
                return True
        return False


class EnvelopeText(Condition):
    """HELO name or MAIL FROM address (the null sender is the empty string)."""

    def __init__(self, what: str, matcher: Matcher) -> None:
        self.what = what
        self.matcher = matcher

    def test(self, ev: Evaluation) -> bool:
        value = (ev.envelope.helo or "") if self.what == "helo" else ev.envelope.mail_from
        hit = self.matcher.find_text(value)
        if hit is None:
            return False
        ev.note(f"{self.what} {hit!r}")
        return True


class RcptCount(Condition):
    def __init__(self, count: Range) -> None:
        self.count = count

    def test(self, ev: Evaluation) -> bool:
        n = len(ev.envelope.rcpt_to)
        if n in self.count:
            ev.note(f"{n} recipients")
            return True
        return False


class Authenticated(Condition):
    """The client authenticated to our MTA (SMTP AUTH, the {auth_authen} macro)."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def test(self, ev: Evaluation) -> bool:
        return bool(ev.envelope.auth_user) == self.value


def dkim_status(outcome: "DKIMOutcome") -> AuthStatus:
    """One status for all signatures: pass if any passes, none without signatures, otherwise
    temperror before fail before the first signature's own status."""
    statuses = [s.status for s in outcome.signatures]
    if not statuses:
        return AuthStatus.NONE
    for wanted in (AuthStatus.PASS, AuthStatus.TEMPERROR, AuthStatus.FAIL):
        if wanted in statuses:
            return wanted
    return statuses[0]


@dataclass
class AuthTest:
    """Authentication outcomes of the other checks. A check that did not run (disabled, failed)
    matches nothing here, so ``auth: {spf: none}`` never fires because SPF was off."""

    spf: frozenset[AuthStatus] = frozenset()
    dkim: frozenset[AuthStatus] = frozenset()
    dmarc: frozenset[AuthStatus] = frozenset()
    arc: frozenset[AuthStatus] = frozenset()
    iprev: frozenset[AuthStatus] = frozenset()
    dkim_domains: frozenset[str] = frozenset()
    dmarc_policy: frozenset[str] = frozenset()
    dkim_aligned: bool | None = None
    spf_aligned: bool | None = None
    arc_trusted: bool | None = None


class Auth(Condition):
    def __init__(self, t: AuthTest) -> None:
        self.t = t

    def test(self, ev: Evaluation) -> bool:
        ARCOutcome, DKIMOutcome, DMARCOutcome, SPFOutcome = _outcome_types()
        t = self.t
        notes = []
        if t.spf:
            spf = ev.outcome("spf", SPFOutcome)
            if spf is None or spf.mailfrom not in t.spf:
                return False
            notes.append(f"spf={spf.mailfrom.value}")
        if t.dkim or t.dkim_domains:
            dkim = ev.outcome("dkim", DKIMOutcome)
            if dkim is None:
                return False
            if t.dkim:
                status = dkim_status(dkim)
                if status not in t.dkim:
                    return False
                notes.append(f"dkim={status.value}")
            if t.dkim_domains:
                passing = {d.lower() for d in dkim.passing_domains()}
                found = sorted(d for d in passing if _domain_in(d, d, t.dkim_domains))
                if not found:
                    return False
                notes.append(f"dkim d={found[0]}")
        if t.dmarc or t.dmarc_policy or t.dkim_aligned is not None or t.spf_aligned is not None:
            dmarc = ev.outcome("dmarc", DMARCOutcome)
            if dmarc is None:
                return False
            if t.dmarc and dmarc.status not in t.dmarc:
                return False
            if t.dmarc_policy and (dmarc.policy or "") not in t.dmarc_policy:
                return False
            if t.dkim_aligned is not None and dmarc.dkim_aligned != t.dkim_aligned:
                return False
            if t.spf_aligned is not None and dmarc.spf_aligned != t.spf_aligned:
                return False
            if t.dmarc:
                notes.append(f"dmarc={dmarc.status.value}")
        if t.arc or t.arc_trusted is not None:
            arc = ev.outcome("arc", ARCOutcome)
            if arc is None:
                return False
            if t.arc and arc.status not in t.arc:
                return False
            if t.arc_trusted is not None and arc.trusted != t.arc_trusted:
                return False
            notes.append(f"arc={arc.status.value}")
        if t.iprev:
            result = ev.results.get("iprev")
            status = getattr(getattr(result, "outcome", None), "status", None)
            if status not in t.iprev:
                return False
            notes.append(f"iprev={status.value}")  # type: ignore[union-attr]
        if notes:
            ev.note(" ".join(notes))
        return True


class Symbol_(Condition):
    """Symbols present: those of the other checks (exact names, or prefixes written
    ``NAME_*``), and other rules' symbols (a rule naming a rule; resolved by the loader, cycles
    refused there), each rule evaluated once per message."""

    cost = 1

    def __init__(self, names: frozenset[str], prefixes: tuple[str, ...]) -> None:
        self.names = names
        self.sorted_names = tuple(sorted(names))   # the first present one is the note
        self.prefixes = prefixes
        self.rule_names: tuple[str, ...] = ()

    def resolve(self, rule_names: set[str] | frozenset[str]) -> None:
        """Split names that are rules from names that are check symbols."""
        self.rule_names = tuple(sorted(self.names & rule_names))
        self.names = frozenset(self.names - set(rule_names))
        self.sorted_names = tuple(sorted(self.names))

    def test(self, ev: Evaluation) -> bool:
        present = ev.symbols
        for name in self.sorted_names:
            if name in present:
                ev.note(f"symbol {name}")
                return True
        if self.prefixes:
            for name in ev.sorted_symbols:
                if name.startswith(self.prefixes):
                    ev.note(f"symbol {name}")
                    return True
        for name in self.rule_names:
            if ev.rule_set.fires(name, ev):
                ev.note(f"rule {name}")
                return True
        return False

    def rule_refs(self) -> Iterable[str]:
        return self.rule_names


def walk(condition: Condition) -> Iterable[Condition]:
    """Every condition in a tree, depth first."""
    yield condition
    for child in getattr(condition, "children", ()):
        yield from walk(child)
    child = getattr(condition, "child", None)
    if child is not None:
        yield from walk(child)


@dataclass
class FromTest:
    name: Matcher | None = None
    address: Matcher | None = None
    domains: frozenset[str] = frozenset()
    not_domains: frozenset[str] = frozenset()
    freemail: bool | None = None
    name_has_other_domain: bool | None = None
    lookalike: bool | None = None
    is_recipient: bool | None = None


# A domain written in a display name ("paypal.com", "service@paypal.com").
_NAME_DOMAIN = re.compile(r"(?:^|[\s<(\"'@])((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24})"
                          r"(?=$|[\s>)\"',;:])", re.I)


def name_domains(display_name: str) -> list[str]:
    """Registered domains named in a From display name."""
    registered_domain = _features_module().registered_domain
    out = []
    for match in _NAME_DOMAIN.finditer(display_name[:200]):
        rd = registered_domain(match.group(1))
        if rd and rd not in out:
            out.append(rd)
    return out


class From(Condition):
    """The (first) From header address and display name."""

    cost = 3

    def __init__(self, t: FromTest) -> None:
        self.t = t

    def test(self, ev: Evaluation) -> bool:
        FREEMAIL = _features_module().FREEMAIL
        f = ev.features
        t = self.t
        notes = []
        if t.domains and not _domain_in(f.from_domain, f.from_rd, t.domains):
            return False
        if t.not_domains and _domain_in(f.from_domain, f.from_rd, t.not_domains):
            return False
        if t.freemail is not None and (f.from_rd in FREEMAIL) != t.freemail:
            return False
        if t.lookalike is not None:
            brand = imitated_brand(f.from_rd)
            if bool(brand) != t.lookalike:
                return False
            if brand:
                notes.append(f"{f.from_rd} imitates {brand}")
        if t.name_has_other_domain is not None:
            others = [d for d in name_domains(f.from_name) if d != f.from_rd]
            if bool(others) != t.name_has_other_domain:
                return False
            if others:
                notes.append(f"name names {others[0]}, address is {f.from_rd or f.from_addr}")
        if t.is_recipient is not None:
            rcpts = {r.lower() for r in ev.envelope.rcpt_to}
            mine = bool(f.from_addr) and f.from_addr.lower() in rcpts
            if mine != t.is_recipient:
                return False
            if mine:
                notes.append(f"From is the recipient {f.from_addr}")
        if t.name is not None:
            hit = t.name.find_text(f.from_name)
            if hit is None:
                return False
            notes.append(f"name {hit!r}")
        if t.address is not None:
            hit = t.address.find_text(f.from_addr)
            if hit is None:
                return False
            notes.append(f"address {hit!r}")
        ev.note("; ".join(notes) if notes else f"from {f.from_addr}")
        return True


@dataclass
class ReplyToTest:
    domains: frozenset[str] = frozenset()
    freemail: bool | None = None
    differs_from_from: bool | None = None


class ReplyTo(Condition):
    """Some Reply-To address satisfies every given predicate (no Reply-To: never matches)."""

    cost = 3

    def __init__(self, t: ReplyToTest) -> None:
        self.t = t

    def test(self, ev: Evaluation) -> bool:
        FREEMAIL = _features_module().FREEMAIL
        f = ev.features
        t = self.t
        for rd in f.reply_to_rds:
            if t.domains and rd not in t.domains:
                continue
            if t.freemail is not None and (rd in FREEMAIL) != t.freemail:
                continue
            if t.differs_from_from is not None and (rd != f.from_rd) != t.differs_from_from:
                continue
            ev.note(f"reply-to {rd} (from {f.from_rd or '-'})")
            return True
        return False


@functools.lru_cache(maxsize=1024)   # several rules read the same Date/Received dates
def _parse_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def reference_time(ev: Evaluation) -> float:
    """When the message reached us: the date of the newest Received header (ours, or our
    relay's), else now. Comparing with it keeps ``scan`` of old mail meaningful, as
    SpamAssassin's DATE_IN_PAST/FUTURE rules do. Computed once per message (several date
    rules ask)."""
    if ev._reference_time is None:
        ev._reference_time = _reference_time(ev)
    return ev._reference_time


def _reference_time(ev: Evaluation) -> float:
    for value in ev.header_values("received", raw=True)[:1]:
        if ";" in value:
            stamp = _parse_date(value.rsplit(";", 1)[1].strip())
            if stamp is not None:
                return stamp
    return ev.now


class Date(Condition):
    """One test on the Date header: ``missing``, ``invalid`` (unparseable), or more than
    ``future_hours`` ahead of / ``past_hours`` before the time we received the message."""

    cost = 3

    def __init__(self, test: str, hours: float = 0.0) -> None:
        self.test_name = test
        self.hours = hours

    def test(self, ev: Evaluation) -> bool:
        values = ev.header_values("date", raw=True)
        if self.test_name == "missing":
            if values:
                return False
            ev.note("no Date header")
            return True
        if not values:
            return False
        stamp = _parse_date(values[0])
        if self.test_name == "invalid":
            if stamp is not None:
                return False
            ev.note(f"Date {_snippet(values[0])!r} is not an RFC 5322 date")
            return True
        if stamp is None:
            return False
        ahead = (stamp - reference_time(ev)) / 3600
        if self.test_name == "future_hours" and ahead > self.hours:
            ev.note(f"Date is {ahead:.0f} h ahead of receipt")
            return True
        if self.test_name == "past_hours" and -ahead > self.hours:
            ev.note(f"Date is {-ahead:.0f} h before receipt")
            return True
        return False


# Each fact from the features and the parsed message. Computed one at a time when a rule asks
# (Evaluation.fact): most messages need a few, and some (image_only, text lengths) are not free.
_FACT_GETTERS: dict[str, Callable[["MessageFeatures", "ParsedMessage"], Any]] = {
    "size": lambda f, m: len(m.raw),
    "text_chars": lambda f, m: len(f.text.strip()),
    "plain_chars": lambda f, m: len(f.text_plain.strip()),
    "html_chars": lambda f, m: len(f.html_text.strip()),
    "hidden_chars": lambda f, m: len(f.hidden_text.strip()),
    "html_only": lambda f, m: f.html_present and not f.text_plain.strip(),
    "image_only": lambda f, m: f.image_only,
    "multipart": lambda f, m: f.content_type.startswith("multipart/"),
    "parts": lambda f, m: len(f.part_types),
    "images": lambda f, m: f.images,
    "tracking_pixels": lambda f, m: f.tracking_pixels,
    "forms": lambda f, m: f.forms,
    "password_inputs": lambda f, m: f.password_inputs,
    "scripts": lambda f, m: f.scripts,
    "iframes": lambda f, m: f.iframes,
    "links": lambda f, m: len(f.links),
    "link_domains": lambda f, m: len(f.link_domains),
    "attachments": lambda f, m: len(f.attachments),
    "to_count": lambda f, m: f.to_count,
    "cc_count": lambda f, m: f.cc_count,
    "received_hops": lambda f, m: f.received_hops,
    "truncated": lambda f, m: f.truncated,
}


MESSAGE_FACTS_BOOL = frozenset({"html_only", "image_only", "multipart", "truncated"})
MESSAGE_FACTS_NUM = frozenset({
    "size", "text_chars", "plain_chars", "html_chars", "hidden_chars", "parts", "images",
    "tracking_pixels", "forms", "password_inputs", "scripts", "iframes", "links", "link_domains",
    "attachments", "to_count", "cc_count", "received_hops"})


class MessageFacts(Condition):
    """Counts and flags of the parsed message (see MESSAGE_FACTS_*); all given must hold."""

    cost = 5

    def __init__(self, bools: Mapping[str, bool], ranges: Mapping[str, Range]) -> None:
        self.bools = dict(bools)
        self.ranges = dict(ranges)

    def test(self, ev: Evaluation) -> bool:
        fact = ev.fact
        for name, want in self.bools.items():
            if fact(name) != want:
                return False
        for name, rng in self.ranges.items():
            if fact(name) not in rng:
                return False
        ev.note(", ".join([f"{n}" for n, v in self.bools.items() if v]
                          + [f"{n}={fact(n):g}" for n in self.ranges]))
        return True


# ---------------------------------------------------------------------------------------------
# Rules and rule sets
# ---------------------------------------------------------------------------------------------
@dataclass
class Rule:
    name: str
    description: str
    score: float
    condition: Condition
    action: Action | None = None
    reason: str = ""
    enabled: bool = True
    file: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class Hit:
    rule: Rule
    notes: list[str]

    @property
    def reason(self) -> str:
        detail = "; ".join(self.notes)
        text = f"{self.rule.description} ({detail})" if detail else self.rule.description
        return text if len(text) <= 240 else text[:237] + "..."


@dataclass
class RuleSet:
    """Compiled rules in evaluation order. ``sources`` keeps every file's text (path -> text)
    so the same set can be rebuilt elsewhere (a worker process) without reading disk again."""

    rules: list[Rule]
    sources: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    disabled: list[Rule] = field(default_factory=list)
    regex_max_mem: int = 4 << 20     # rules.limits.regex_max_mem, for the PatternSets

    def __post_init__(self) -> None:
        self.by_name = {r.name: r for r in self.rules}
        # Each body condition once, even when several rules share it.
        conditions = {id(c): c for r in self.rules for c in walk(r.condition)}
        self.pattern_sets = build_pattern_sets(conditions.values(), self.regex_max_mem)

    def __len__(self) -> int:
        return len(self.rules)

    def fires(self, name: str, ev: Evaluation) -> bool:
        """Whether rule ``name`` matches (memoized per message; a disabled or unknown rule does
        not)."""
        cached = ev.memo.get(name)
        if cached is not None:
            return cached
        rule = self.by_name.get(name)
        if rule is None:
            ev.memo[name] = False
            return False
        saved = ev.notes
        ev.notes = []
        try:
            fired = rule.condition.test(ev)
            ev.memo[name] = fired
            ev.rule_notes[name] = ev.notes
        finally:
            ev.notes = saved
        return fired

    def evaluate(self, ev: Evaluation) -> list[Hit]:
        hits = []
        for rule in self.rules:
            if self.fires(rule.name, ev):
                hits.append(Hit(rule, list(ev.rule_notes[rule.name])))
        return hits


def strongest_action(hits: Sequence[Hit]) -> Hit | None:
    """The hit forcing the strongest action (first in rule order among equals)."""
    best: Hit | None = None
    for hit in hits:
        if hit.rule.action is None:
            continue
        if best is None or hit.rule.action.rank > best.rule.action.rank:  # type: ignore[union-attr]
            best = hit
    return best
