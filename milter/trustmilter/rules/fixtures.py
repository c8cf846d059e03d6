"""Rule fixtures: example messages with the symbols (and action) the rules must give them, run
through the real ``pipeline.evaluate``.

A fixture file (``fixtures/*.yaml`` beside the rules) maps fixture names to fixtures::

    GTUBE_REJECT_fires:
      message: |                      # or message_file: some.eml (relative to this file)
        From: a@example.org
        Subject: test

        XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X
      envelope: {client_ip: 192.0.2.1, helo: mail.example.org, mail_from: a@example.org,
                 rcpt: [b@example.net]}          # optional; see below
      dns:                                       # optional records the fixture's DNS serves
        - [example.org, TXT, "v=spf1 ip4:192.0.2.1 -all"]
      config: {uribl: {lists: {spamhaus_dbl: {enabled: true}}}}   # optional config overrides
      expect:
        symbols: [GTUBE_REJECT]                  # must be present
        absent: [GTUBE_JUNK]                     # must not be
        action: reject                           # optional

Nothing reaches the internet: every lookup goes to a DNS server on 127.0.0.1 that this module
starts, which answers the fixture's ``dns`` records and NXDOMAIN for everything else. The
envelope defaults to no client IP (so IP-based checks stand aside), MAIL FROM = the From
address, and the To addresses as recipients. Checks whose results depend on this site's
learned state (``SITE_STATE_CHECKS``) are switched off so a fixture means the same everywhere.
"""
from __future__ import annotations

import copy
import email.utils
import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from trustmilter.config import Config, load_config, load_yaml
from trustmilter.errors import ConfigError
from trustmilter.rules.engine import RuleSet
from trustmilter.rules.loader import FIXTURES_DIR, rule_files
from trustmilter.types import Action, Envelope

# Checks that read this site's learned state (Bayes tokens, reputation history): off in fixture
# runs, or a fixture would pass at one site and fail at another.
SITE_STATE_CHECKS = ("bayes", "reputation")
FIXTURE_KEYS = ("description", "message", "message_file", "envelope", "dns", "config", "expect")
ENVELOPE_KEYS = ("client_ip", "helo", "mail_from", "rcpt", "auth_user")
EXPECT_KEYS = ("symbols", "absent", "action")


@dataclass
class Fixture:
    name: str
    file: str
    line: int | None
    message: bytes
    envelope: Envelope
    dns: list[tuple[str, str, str]] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    action: Action | None = None
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass
class FixtureResult:
    fixture: Fixture
    problems: list[str]
    action: str = ""
    score: float = 0.0
    symbols: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.fixture.name, "file": self.fixture.file, "line": self.fixture.line,
                "passed": self.passed, "problems": self.problems, "action": self.action,
                "score": round(self.score, 3), "symbols": self.symbols}


# ---------------------------------------------------------------------------------------------
# Reading fixtures
# ---------------------------------------------------------------------------------------------
def fixture_files(path: Path) -> list[Path]:
    return rule_files(path)


def load_fixtures(path: Path) -> list[Fixture]:
    """Every fixture in a file or a folder of files. Errors name file, line and key."""
    out: list[Fixture] = []
    for file in fixture_files(path):
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read: {exc}", file=str(file)) from None
        data = load_yaml(text, str(file))
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError("a fixture file is a mapping of fixture names to fixtures",
                              file=str(file), line=1)
        lines = getattr(data, "lines", {})
        for name, body in data.items():
            out.append(_fixture(str(name), body, file, lines.get(name)))
    return out


def _fixture(name: str, body: Any, file: Path, line: int | None) -> Fixture:
    def err(message: str, key: str, at: Any = None, sub: str | None = None) -> ConfigError:
        where = line
        if at is not None and sub is not None:
            where = getattr(at, "lines", {}).get(sub, line)
        return ConfigError(message, file=str(file), line=where, key=f"{name}.{key}")

    if not isinstance(body, dict):
        raise err("a fixture is a mapping (message, expect, ...)", "")
    for key in body:
        if key not in FIXTURE_KEYS:
            raise err(f"unknown key; expected some of {', '.join(FIXTURE_KEYS)}", key, body, key)
    if ("message" in body) == ("message_file" in body):
        raise err("give exactly one of message and message_file", "message")
    if "message" in body:
        if not isinstance(body["message"], str):
            raise err("expected the message as text", "message", body, "message")
        raw = body["message"].encode("utf-8")
    else:
        target = file.parent / str(body["message_file"])
        try:
            raw = target.read_bytes()
        except OSError as exc:
            raise err(f"cannot read {target}: {exc.strerror}", "message_file", body,
                      "message_file") from None
    expect = body.get("expect")
    if not isinstance(expect, dict) or not expect:
        raise err("expected a mapping with symbols, absent and/or action", "expect", body,
                  "expect")
    for key in expect:
        if key not in EXPECT_KEYS:
            raise err(f"unknown key; expected some of {', '.join(EXPECT_KEYS)}",
                      f"expect.{key}", expect, key)
    symbols = _names(expect.get("symbols", []), lambda m: err(m, "expect.symbols", expect,
                                                             "symbols"))
    absent = _names(expect.get("absent", []), lambda m: err(m, "expect.absent", expect, "absent"))
    action = None
    if "action" in expect:
        try:
            action = Action(expect["action"])
        except ValueError:
            raise err("expected one of " + ", ".join(a.value for a in Action), "expect.action",
                      expect, "action") from None
    envelope = _envelope(body.get("envelope"), raw, lambda m, k: err(m, f"envelope.{k}",
                                                                      body.get("envelope"), k))
    records = _records(body.get("dns", []), lambda m: err(m, "dns", body, "dns"))
    description = body.get("description", "")
    if not isinstance(description, str):
        raise err("expected a string", "description", body, "description")
    overrides = body.get("config") or {}
    if not isinstance(overrides, dict):
        raise err("expected a mapping of config overrides", "config", body, "config")
    try:  # validated against the documented defaults now, with this file's name in the error
        load_config(None, _plain(overrides))
    except ConfigError as exc:
        raise err(f"bad config override: {exc.detail} ({exc.key})", "config", body,
                  "config") from None
    return Fixture(name=name, file=str(file), line=line, message=raw, envelope=envelope,
                   dns=records, symbols=symbols, absent=absent, action=action,
                   description=description, config=_plain(overrides))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _names(value: Any, err: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in items):
        raise err("expected a list of symbol names")
    return list(items)


def _envelope(spec: Any, raw: bytes, err: Any) -> Envelope:
    from trustmilter.message import ParsedMessage
    spec = spec or {}
    if not isinstance(spec, dict):
        raise err("expected a mapping", "")
    for key in spec:
        if key not in ENVELOPE_KEYS:
            raise err(f"unknown key; expected some of {', '.join(ENVELOPE_KEYS)}", key)
    msg = ParsedMessage.parse(raw)
    mail_from = spec.get("mail_from")
    if mail_from is None:
        mail_from = msg.from_addresses[0] if msg.from_addresses else ""
    rcpt = spec.get("rcpt")
    if rcpt is None:
        rcpt = [a for _n, a in email.utils.getaddresses(msg.get_all("To")) if a] or \
            ["user@example.net"]
    if isinstance(rcpt, str):
        rcpt = [rcpt]
    for key, value in (("client_ip", spec.get("client_ip")), ("helo", spec.get("helo")),
                       ("mail_from", mail_from), ("auth_user", spec.get("auth_user"))):
        if value is not None and not isinstance(value, str):
            raise err("expected a string", key)
    if not isinstance(rcpt, list) or not all(isinstance(r, str) for r in rcpt):
        raise err("expected a list of addresses", "rcpt")
    return Envelope(client_ip=spec.get("client_ip"), helo=spec.get("helo"), mail_from=mail_from,
                    rcpt_to=tuple(rcpt), auth_user=spec.get("auth_user"))


def _records(value: Any, err: Any) -> list[tuple[str, str, str]]:
    if not isinstance(value, list):
        raise err("expected a list of [name, type, value]")
    out = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 3
                or not all(isinstance(v, str) for v in item)):
            raise err("each record is [name, type, value]")
        name, rtype, data = item
        try:
            _rdata(rtype, data)
        except Exception as exc:  # noqa: BLE001 - dnspython raises many types on bad rdata
            raise err(f"bad record {item!r}: {exc}") from None
        out.append((name.rstrip(".").lower(), rtype.upper(), data))
    return out


def _rdata(rtype: str, data: str) -> dns.rdata.Rdata:
    rdtype = dns.rdatatype.from_text(rtype.upper())
    if rdtype == dns.rdatatype.TXT:
        raw = data.encode("utf-8")
        chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rdtype, chunks)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, data)


# ---------------------------------------------------------------------------------------------
# A DNS server for fixtures: the records given, NXDOMAIN for the rest, on 127.0.0.1
# ---------------------------------------------------------------------------------------------
class FixtureDNS:
    """Authoritative-style answers over UDP (and TCP for big ones) on a random loopback port."""

    def __init__(self) -> None:
        self._zone: dict[str, dict[int, list[dns.rdata.Rdata]]] = {}
        self._lock = threading.Lock()
        for attempt in range(20):   # one port for UDP and TCP: retry if TCP's is taken
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._udp.bind(("127.0.0.1", 0))
            self.port = self._udp.getsockname()[1]
            self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self._tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self._udp.close()
                self._tcp.close()
                if attempt == 19:
                    raise
        self._tcp.listen(16)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True, name="fixture-dns"),
                         threading.Thread(target=self._serve_tcp, daemon=True, name="fixture-dns")]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_records(self, records: list[tuple[str, str, str]]) -> None:
        zone: dict[str, dict[int, list[dns.rdata.Rdata]]] = {}
        for name, rtype, data in records:
            rdata = _rdata(rtype, data)
            zone.setdefault(name, {}).setdefault(int(rdata.rdtype), []).append(rdata)
        with self._lock:
            self._zone = zone

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - garbage on the socket: ignore it
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        with self._lock:
            node = self._zone.get(name)
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            rdatas = node.get(int(question.rdtype), [])
            if rdatas:
                rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
                for rdata in rdatas:
                    rrset.add(rdata, ttl=300)
                response.answer.append(rrset)
        return response.to_wire()

    def _serve_udp(self) -> None:
        self._udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.answer(wire)
            if reply is None:
                continue
            if len(reply) > 1232:   # the resolver's EDNS size: say "truncated", it retries on TCP
                query = dns.message.from_wire(wire)
                short = dns.message.make_response(query)
                short.flags |= dns.flags.TC
                reply = short.to_wire()
            try:
                self._udp.sendto(reply, peer)
            except OSError:
                pass

    def _serve_tcp(self) -> None:
        self._tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _peer = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    head = conn.recv(2)
                    size = int.from_bytes(head, "big") if len(head) == 2 else 0
                    wire = b""
                    while len(wire) < size:
                        chunk = conn.recv(size - len(wire))
                        if not chunk:
                            break
                        wire += chunk
                    reply = self.answer(wire)
                    if reply is not None:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        for sock in (self._udp, self._tcp):
            sock.close()
        for t in self._threads:
            t.join(timeout=1)


# ---------------------------------------------------------------------------------------------
# Running fixtures
# ---------------------------------------------------------------------------------------------
def fixture_config(config_path: str | None, dns_address: str,
                   extra: dict[str, Any] | None = None) -> Config:
    """The site's config with DNS pointed at the fixture server, short timeouts, no cache,
    plus a fixture's own ``config`` overrides."""
    overrides = _merge(copy.deepcopy(extra or {}),
                       {"dns": {"server": dns_address, "timeout": 1.0, "deadline": 3.0,
                                "cache_size": 0}})
    return load_config(config_path, overrides)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def run_fixtures(fixtures: list[Fixture], config_path: str | None, rule_set: RuleSet | None,
                 all_checks: bool = False) -> list[FixtureResult]:
    """Evaluate each fixture with the real pipeline; ``rule_set`` None = the configured one."""
    from trustmilter.checks import rules as rules_check
    from trustmilter.pipeline import Engine, evaluate

    server = FixtureDNS()
    engines: dict[str, Engine] = {}

    def engine_for(fixture: Fixture) -> Engine:
        key = json.dumps(fixture.config, sort_keys=True)
        if key not in engines:
            engine = Engine.from_config(fixture_config(config_path, server.address,
                                                       fixture.config))
            if rule_set is not None:
                rules_check.install(engine, rule_set)
            if rules_check.NAME in engine.disabled:
                raise ConfigError("the rules check is disabled: "
                                  f"{engine.disabled[rules_check.NAME]}", key="rules")
            if not all_checks:
                for name in SITE_STATE_CHECKS:
                    engine.disabled.setdefault(name, "off in fixture runs (site state)")
            engines[key] = engine
        return engines[key]

    try:
        results = []
        for fixture in fixtures:
            engine = engine_for(fixture)
            server.set_records(fixture.dns)
            verdict = evaluate(fixture.envelope, fixture.message, engine)
            names = verdict.symbol_names()
            problems = [f"expected symbol {s} is missing" for s in fixture.symbols
                        if s not in names]
            problems += [f"symbol {s} is present but must not be" for s in fixture.absent
                         if s in names]
            if fixture.action is not None and verdict.action is not fixture.action:
                problems.append(f"action is {verdict.action.value}, expected "
                                f"{fixture.action.value} ({verdict.reason or 'by score'})")
            results.append(FixtureResult(fixture, problems, verdict.action.value, verdict.score,
                                         names))
        return results
    finally:
        server.close()


def fixtures_dir(rules_dir: Path) -> Path:
    return rules_dir / FIXTURES_DIR


def uncovered_rules(rule_set: RuleSet, fixtures: list[Fixture],
                    rule_dirs: list[Path]) -> list[str]:
    """Enabled rules from ``rule_dirs`` that no fixture expects to fire."""
    expected = {s for f in fixtures for s in f.symbols}
    dirs = {d.resolve() for d in rule_dirs}
    out = []
    for rule in rule_set.rules:
        if Path(rule.file).resolve().parent in dirs and rule.name not in expected:
            out.append(rule.name)
    return out
