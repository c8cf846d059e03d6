"""``trustmilter serve``: the milter Postfix and Sendmail talk to.

A thin pymilter adapter. The libmilter threads only gather (client address and HELO as the MTA
reports them, envelope, macros, header bytes exactly as received, body) and apply the verdict
(Authentication-Results, spam headers, subject tag, quarantine, reject/tempfail replies);
``evaluate`` runs in worker processes (``trustmilter.workers``).

Signals (measured, see ../shared/PITFALLS.md): libmilter handles HUP, TERM and INT itself in its
own thread, and all three stop it cleanly after the connections in progress end. Reload is SIGUSR1
(systemd's ExecReload sends it): it re-reads the config and replaces the worker pool without closing
any MTA connection. Threads that exist before we can block signals (native libraries such as
OpenBLAS start them when numpy is imported by a check) would take a blocked-elsewhere signal with
its default action, which for TERM and USR1 is death; so every one of these signals also gets a
Python handler whose only effect is a byte on a wakeup pipe, and our control thread turns that
byte into a stop (smfi_stop) or a reload, whichever thread the kernel picked.
"""
from __future__ import annotations

import argparse
import grp
import ipaddress
import json
import logging
import os
import pwd
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import Milter
import milter as libmilter  # pymilter's C module (never shadow it: our package is trustmilter)

from trustmilter import authresults
from trustmilter.config import DEFAULT_CONFIG_PATH, Config, load_config
from trustmilter.errors import ConfigError, TrustmilterError
from trustmilter.received import in_networks, parse_networks
from trustmilter.rules.loader import load_rule_set
from trustmilter.store.recorder import StateRecorder
from trustmilter.types import Action, Envelope, Verdict
from trustmilter.workers import (EvaluationFailed, EvaluationTimeout, PoolClosed, PoolHolder,
                                 WorkerLost, WorkerPool, default_size, prepare_context,
                                 setup_logging)

log = logging.getLogger("trustmilter.server")
msglog = logging.getLogger("trustmilter.message")

MILTER_NAME = "trustmilter"
AUTHRES = "Authentication-Results"
# Spam headers are ours on this host: incoming copies (forged or from elsewhere) are removed so
# Sieve scripts and clients only ever see the ones we wrote.
OWN_SPAM_HEADERS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Status")
# Insert position of our headers: Postfix counts its own (hidden) Received header as index 0, so
# index 1 puts Authentication-Results right below the Received header of this MTA.
HEADER_INDEX = 1
FOLD_WIDTH = 78
MAX_LINE = 990          # RFC 5322 2.1.1: 998 octets per line, hard limit
STOP_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
RELOAD_SIGNAL = signal.SIGUSR1

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_XCODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


# ---- making values safe for headers, replies and logs -------------------------------------------
def clean_text(value: str) -> str:
    """One line of text: CR, LF, NUL and other control characters become spaces (no header or
    reply injection from anything a sender controls), lone surrogates become U+FFFD."""
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(_CONTROL.sub(" ", value).replace("\t", " ").split())


def fold(name: str, value: str, width: int = FOLD_WIDTH) -> str:
    """Fold a cleaned header value at spaces into lines of at most ``width`` characters (the first
    line counts "Name: "), joined with LF + TAB as libmilter expects. A word longer than the hard
    line limit is cut: nothing we write may break RFC 5322's 998-octet limit."""
    words = [w[:MAX_LINE - 2] for w in clean_text(value).split(" ") if w]
    lines: list[str] = []
    current = ""
    used = len(name) + 2          # "Name: " precedes the first line
    for word in words:
        if not current:
            current, used = word, used + len(word)
        elif used + 1 + len(word) > width:
            lines.append(current)
            current, used = word, 1 + len(word)   # continuation lines start with a TAB
        else:
            current, used = f"{current} {word}", used + 1 + len(word)
    if current:
        lines.append(current)
    return "\n\t".join(lines)


def smtp_text(value: str, limit: int = 400, reply: bool = True) -> str:
    """Text for an SMTP reply (or, reply=False, a quarantine reason): one ASCII line, bounded in
    length; in a reply '%' is doubled (libmilter drops a reply with a lone '%')."""
    text = clean_text(value).encode("ascii", "replace").decode("ascii")
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text.replace("%", "%%") if reply else text


def reply_codes(code: str | None, xcode: str | None, default: tuple[str, str]) -> tuple[str, str]:
    """A valid (rcode, xcode) pair: 4xx/5xx, and an enhanced code of the same class."""
    rcode = code if code and re.fullmatch(r"[45]\d\d", code) else default[0]
    if not xcode or not _XCODE.match(xcode) or xcode[0] != rcode[0]:
        xcode = default[1] if default[1][0] == rcode[0] else f"{rcode[0]}.7.1"
    return rcode, xcode


_log_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _log_value(value: Any) -> str:
    text = str(value)
    if text and not re.search(r"[\s\"=\\\x00-\x1f\x7f]", text):
        return text
    return json.dumps(text, ensure_ascii=False)


def format_log_line(fields: dict[str, Any], fmt: str) -> str:
    """One line per message: key=value pairs for grep, or a JSON object."""
    if fmt == "json":
        return _log_json(fields)
    return " ".join(f"{k}={_log_value(v)}" for k, v in fields.items() if v is not None)


def normalise_ip(value: str) -> str | None:
    try:
        addr = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)


def strip_brackets(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address.strip()


# ---- settings read from config (re-read on reload) ----------------------------------------------
@dataclass(frozen=True)
class Settings:
    authserv_id: str
    trusted_networks: tuple[Any, ...]
    trusted_relays: tuple[Any, ...]
    eval_timeout: float
    progress_interval: float
    on_error: str
    max_message_bytes: int
    skip_authenticated: bool
    skip_trusted_networks: bool
    skip_local: bool
    log_format: str

    @classmethod
    def from_config(cls, config: Config) -> "Settings":
        m = config.section("milter")
        on_error = str(m["on_error"])
        if on_error not in ("tempfail", "accept"):
            raise ConfigError("must be tempfail or accept", key="milter.on_error")
        log_format = str(m["log_format"])
        if log_format not in ("text", "json"):
            raise ConfigError("must be text or json", key="milter.log_format")
        return cls(
            authserv_id=config.authserv_id,
            trusted_networks=tuple(parse_networks(config.data["trusted_networks"])),
            trusted_relays=tuple(parse_networks(config.data["trusted_relays"])),
            eval_timeout=float(m["eval_timeout"]),
            progress_interval=max(1.0, float(m["progress_interval"])),
            on_error=on_error,
            max_message_bytes=int(m["max_message_bytes"]),
            skip_authenticated=bool(m["skip_authenticated"]),
            skip_trusted_networks=bool(m["skip_trusted_networks"]),
            skip_local=bool(m["skip_local"]),
            log_format=log_format,
        )


def set_listener_nodelay(port: int) -> int:
    """TCP_NODELAY on libmilter's listening socket (accepted connections inherit it on Linux).
    libmilter does not set it, and a milter's replies at end of message are several small
    writes (header changes, then the verdict) that Nagle's algorithm holds back until the MTA's
    delayed ACK: measured here, +45% messages/s over TCP. Returns how many sockets were set."""
    done = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))   # a dup: family detected, ours to close
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done += 1
        except OSError:
            pass
        finally:
            sock.close()
    return done


# ---- the milter ---------------------------------------------------------------------------------
@Milter.header_leading_space
class TrustMilter(Milter.Base):
    """One SMTP connection. Callbacks only record; ``eom`` hands the message to a worker and
    applies the verdict."""

    server: "MilterServer"   # set by MilterServer before libmilter starts

    def __init__(self) -> None:
        self.client_ip: str | None = None
        self.client_name: str | None = None
        self.helo: str | None = None
        self.mta_hostname: str | None = None
        self.daemon_name: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.mail_from = ""
        self.rcpts: list[str] = []
        self.auth_user: str | None = None
        self.headers: list[tuple[str, bytes]] = []
        self.body_chunks: list[bytes] = []
        self.size = 0
        self.too_big = False

    @property
    def leadspc(self) -> bool:
        """True when the MTA sends (and expects from us) header values with their leading space."""
        return bool(self._protocol & Milter.P_HDR_LEADSPC)

    # ----- gathering ------------------------------------------------------------------------
    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        # The address the MTA reports (Postfix's XCLIENT changes it), never a header.
        self.client_ip = None
        # Postfix emulates a connect from "localhost" 127.0.0.1 with port 0 for mail from the
        # sendmail command (non_smtpd_milters); a real TCP peer never has port 0.
        if (family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple)
                and not (len(hostaddr) > 1 and hostaddr[1] == 0)):
            self.client_ip = normalise_ip(str(hostaddr[0]))
        name = (hostname or "").strip()
        # The MTA gives "[1.2.3.4]" (or "unknown") when it has no verified reverse name.
        self.client_name = None if not name or name.startswith("[") or name == "unknown" else name
        self.mta_hostname = self.getsymval("j")
        self.daemon_name = self.getsymval("{daemon_name}")
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        self.helo = hostname
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, mail_from: str, *params: str) -> int:
        self._reset()
        self.mail_from = strip_brackets(mail_from)
        self.auth_user = self.getsymval("{auth_authen}") or None
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, rcpt: str, *params: str) -> int:
        self.rcpts.append(strip_brackets(rcpt))
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name: str, value: bytes) -> int:
        # Bytes exactly as received (DKIM with simple canonicalization needs them).
        self.size += len(name) + len(value) + 3
        if self.size > self.server.settings.max_message_bytes:
            self.too_big = True
        if not self.too_big:
            self.headers.append((name, value))
        return Milter.CONTINUE

    def data(self) -> int:
        # Nothing to do at DATA, but answering matters over TCP: Postfix sends the DATA macros
        # even for a milter that skips the DATA event, and with nothing to answer our kernel
        # delays its ACK, so Nagle holds Postfix's next write (the headers) ~40 ms per message.
        # Taking the event (with a reply) lets that ACK ride on our answer: measured 47 -> 9 ms
        # for the DATA phase of one message over inet:, unchanged over unix:.
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.size += len(chunk)
        if self.too_big or self.size > self.server.settings.max_message_bytes:
            self.too_big = True
            self.body_chunks = []
            # No need to receive the rest: it will not be scanned.
            return Milter.SKIP if self._protocol & Milter.P_SKIP else Milter.CONTINUE
        self.body_chunks.append(chunk)
        return Milter.CONTINUE

    def abort(self) -> int:
        self._reset()
        return Milter.CONTINUE

    def close(self) -> int:
        return Milter.CONTINUE

    def raw_message(self) -> bytes:
        """The message as the client sent it: header lines with CRLF line ends (the MTA passes
        folded values with bare LF), an empty line, the body (already CRLF)."""
        out = bytearray()
        for name, value in self.headers:
            value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            out += name.encode("ascii", "surrogateescape") + b":"
            if not self.leadspc and value[:1] not in (b" ", b"\t"):
                out += b" "
            out += value + b"\r\n"
        out += b"\r\n"
        for chunk in self.body_chunks:
            out += chunk
        return bytes(out)

    def envelope(self) -> Envelope:
        return Envelope(client_ip=self.client_ip, client_name=self.client_name, helo=self.helo,
                        mail_from=self.mail_from, rcpt_to=tuple(self.rcpts),
                        queue_id=self.getsymval("i") or None, auth_user=self.auth_user,
                        daemon_name=self.daemon_name, mta_hostname=self.mta_hostname)

    # ----- deciding -------------------------------------------------------------------------
    def skip_reason(self, settings: Settings) -> str | None:
        if self.auth_user and settings.skip_authenticated:
            return "authenticated"
        if self.client_ip is None:
            return "local" if settings.skip_local else None
        if settings.skip_trusted_networks and in_networks(self.client_ip,
                                                          list(settings.trusted_networks)):
            # A trusted relay's mail is judged by the hop behind it, not skipped.
            if not (settings.trusted_relays and in_networks(self.client_ip,
                                                            list(settings.trusted_relays))):
                return "trusted-network"
        if self.too_big:
            return "too-big"
        return None

    def eom(self) -> int:
        started = time.perf_counter()
        server = self.server
        settings = server.settings
        envelope = self.envelope()
        fields: dict[str, Any] = {
            "queue_id": envelope.queue_id or "-", "client_ip": self.client_ip or "-",
            "helo": self.helo, "from": f"<{self.mail_from}>", "rcpts": len(self.rcpts),
        }
        try:
            forged = authresults.forged_indexes(
                [self._value_text(v) for n, v in self.headers if n.lower() == AUTHRES.lower()],
                settings.authserv_id)
            skip = self.skip_reason(settings)
            if skip is not None:
                self._delete(AUTHRES, forged)
                fields.update(action="skip", why=skip)
                return Milter.ACCEPT
            verdict, error = server.evaluate(self, envelope, self.raw_message())
            if verdict is None:
                fields.update(action=f"error-{settings.on_error}", why=error)
                return self._on_error(settings, forged)
            fields.update(action=verdict.action.value, score=round(verdict.score, 3),
                          symbols=",".join(f"{s.name}({s.score:g})" for s in verdict.symbols),
                          eval_ms=round(verdict.elapsed_ms, 1))
            if verdict.reason:
                fields["reason"] = clean_text(verdict.reason)
            result = self.apply(verdict, forged)
            # History, reputation and the quarantine index: queued to the state writer thread,
            # never blocking this connection.
            if server.recorder is not None:
                server.recorder.record(envelope, verdict, subject=self._header_text("subject"),
                                       message_id=self._header_text("message-id"))
            return result
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the message
            log.exception("queue_id=%s: milter error", envelope.queue_id)
            fields.update(action=f"error-{settings.on_error}", why=f"{type(exc).__name__}: {exc}")
            return self._on_error(settings, [])
        finally:
            fields["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
            msglog.info("%s", format_log_line(fields, settings.log_format))
            self._reset()

    def _on_error(self, settings: Settings, forged: list[int]) -> int:
        if settings.on_error == "accept":
            try:
                self._delete(AUTHRES, forged)
            except Exception:  # noqa: BLE001
                log.exception("could not remove forged Authentication-Results")
            return Milter.ACCEPT
        self.setreply("451", "4.3.0", "trustmilter: temporary failure, please try again later")
        return Milter.TEMPFAIL

    # ----- applying -------------------------------------------------------------------------
    def apply(self, verdict: Verdict, forged: list[int]) -> int:
        action = verdict.action
        if action is Action.REJECT:
            code, xcode = reply_codes(verdict.smtp_code, verdict.smtp_xcode, ("550", "5.7.1"))
            self.setreply(code, xcode, smtp_text(verdict.reason or "message refused"))
            return Milter.REJECT
        if action is Action.TEMPFAIL:
            code, xcode = reply_codes(verdict.smtp_code, verdict.smtp_xcode, ("451", "4.7.1"))
            self.setreply(code, xcode, smtp_text(verdict.reason or "please try again later"))
            return Milter.TEMPFAIL
        # Deletions first, each name highest index first: the MTA renumbers after every delete,
        # and our own inserts would shift the indexes too.
        self._delete(AUTHRES, forged)
        spam_names = {n.lower() for n in OWN_SPAM_HEADERS} | {n.lower() for n, _ in
                                                             verdict.add_headers}
        for lname in sorted(spam_names):
            count = sum(1 for n, _ in self.headers if n.lower() == lname)
            self._delete(self._name_as_sent(lname), list(range(count, 0, -1)))
        index = HEADER_INDEX
        self._insert(AUTHRES, verdict.authentication_results, index)
        for name, value in verdict.add_headers:
            index += 1
            self._insert(name, value, index)
        if verdict.subject_tag:
            self._tag_subject(verdict.subject_tag)
        if action is Action.QUARANTINE:
            self.quarantine(smtp_text(verdict.reason or "held by trustmilter", reply=False))
        return Milter.ACCEPT

    def _header_text(self, lname: str) -> str:
        for name, value in self.headers:
            if name.lower() == lname:
                return clean_text(self._value_text(value)).strip()
        return ""

    def _value_text(self, value: bytes) -> str:
        return value.decode("utf-8", "replace")

    def _name_as_sent(self, lname: str) -> str:
        for name, _ in self.headers:
            if name.lower() == lname:
                return name
        return lname

    def _delete(self, name: str, indexes: list[int]) -> None:
        for index in sorted(indexes, reverse=True):
            self.chgheader(name, index, None)

    def _lead(self, value: str) -> str:
        return " " + value if self.leadspc else value

    def _insert(self, name: str, value: str, index: int) -> None:
        self.addheader(name, self._lead(fold(name, value)), index)

    def _tag_subject(self, tag: str) -> None:
        tag = clean_text(tag)
        for name, value in self.headers:
            if name.lower() == "subject":
                text = value.decode("utf-8", "replace").replace("\r\n", "\n")
                # Keep the original folding (LF + WSP); any other CR/LF becomes a space.
                text = re.sub(r"\r|\n(?![ \t])", " ", text)
                text = _CONTROL.sub(lambda m: m.group(0) if m.group(0) == "\n" else " ", text)
                if text.strip().startswith(tag):
                    return
                self.chgheader(name, 1, self._lead(f"{tag} {text.lstrip(' ')}"))
                return
        self.addheader("Subject", self._lead(tag), -1)


# ---- the process --------------------------------------------------------------------------------
def resolve_config_path(path: str | None) -> str | None:
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH
    return path


def _merge_overrides(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def socket_path(spec: str) -> str | None:
    """The filesystem path of a unix socket spec, or None for inet/inet6."""
    if spec.startswith(("unix:", "local:")):
        return spec.split(":", 1)[1]
    if spec.startswith("/"):
        return spec
    return None


def inet_port(spec: str) -> int | None:
    """The port of an "inet:PORT@HOST" / "inet6:PORT@HOST" spec."""
    if spec.startswith(("inet:", "inet6:")):
        port = spec.split(":", 1)[1].split("@", 1)[0]
        return int(port) if port.isdigit() else None
    return None


def resolve_user(spec: str) -> tuple[int, int, str]:
    """"user" or "user:group" -> (uid, gid, user name); the group defaults to the user's own."""
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError as exc:
        raise ConfigError(f"no such user or group: {exc.args[0]}", key="milter.user") from None
    return entry.pw_uid, gid, entry.pw_name


def drop_privileges(uid: int, gid: int, name: str, own: list[str]) -> None:
    """Become ``uid``/``gid`` for good (with the user's supplementary groups), after giving the
    paths in ``own`` (state directory and its files, the log file) to that user."""
    for path in own:
        if not os.path.exists(path):
            continue
        os.chown(path, uid, gid)
        if os.path.isdir(path):
            for entry in os.scandir(path):
                if entry.is_file(follow_symlinks=False):
                    os.chown(entry.path, uid, gid)
    os.setgroups(os.getgrouplist(name, gid))
    os.setgid(gid)
    os.setuid(uid)
    try:   # setuid as root is for good: prove that it cannot be undone
        os.setuid(0)
    except PermissionError:
        return
    raise TrustmilterError("could not drop root privileges")


def parse_owner(owner: str) -> tuple[int, int]:
    """"user", "user:group" or ":group" -> (uid, gid), -1 for what is not given. Empty: when we
    run as root, group postfix (if it exists) so Postfix's smtpd may connect; else unchanged."""
    if not owner:
        if os.geteuid() == 0:
            try:
                return -1, grp.getgrnam("postfix").gr_gid
            except KeyError:
                pass
        return -1, -1
    user, _, group = owner.partition(":")
    try:
        uid = pwd.getpwnam(user).pw_uid if user else -1
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError as exc:
        raise ConfigError(f"no such user or group: {exc.args[0]}", key="milter.socket_owner") from None
    return uid, gid


class MilterServer:
    """Owns the settings, the worker pool and the libmilter main loop."""

    def __init__(self, config_path: str | None, overrides: dict[str, Any], config: Config,
                 log_setup: dict[str, Any]) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.config = config
        self.settings = Settings.from_config(config)
        self.log_setup = log_setup
        self._mp_context: Any = None
        self.holder: PoolHolder | None = None
        self._reload_lock = threading.Lock()
        self.socket_spec = str(config.section("milter")["socket"])
        self.recorder: StateRecorder | None = None
        self._created_socket_dir = False

    # ----- worker pool ----------------------------------------------------------------------
    def _worker_overrides(self, config: Config) -> dict[str, Any]:
        # Workers resolve the same authserv_id as we do (the default is this host's name).
        return _merge_overrides(self.overrides, {"authserv_id": config.authserv_id})

    def _new_pool(self, config: Config, generation: int) -> WorkerPool:
        size = default_size(int(config.section("milter")["workers"]))
        return WorkerPool(self._mp_context, size, self.config_path,
                          self._worker_overrides(config), generation, self.log_setup)

    def start_pool(self) -> None:
        pool = self._new_pool(self.config, 1)
        pids = pool.warm_up()
        self.holder = PoolHolder(pool)
        log.info("%d worker processes ready (pids %s)", pool.size, ",".join(map(str, pids)))

    def evaluate(self, conn: TrustMilter, envelope: Envelope, raw: bytes
                 ) -> tuple[Verdict | None, str]:
        """Run evaluate in a worker; keep the MTA informed while waiting. Returns (verdict, "")
        or (None, why) when no verdict could be had in time."""
        assert self.holder is not None
        settings = self.settings
        deadline = time.monotonic() + settings.eval_timeout
        last_error = ""
        for _attempt in range(2):   # a second try only after a dead worker or a swapped pool
            try:
                return self.holder.pool.evaluate(envelope, raw, deadline,
                                                 settings.progress_interval, conn.progress), ""
            except PoolClosed:          # a reload retired that pool in this instant
                last_error = "worker pool retired by a reload"
            except WorkerLost as exc:
                last_error = f"worker died: {exc}"
            except EvaluationTimeout:
                return None, f"no verdict within {settings.eval_timeout:g}s"
            except EvaluationFailed as exc:
                log.error("queue_id=%s: evaluate failed: %s", envelope.queue_id, exc)
                return None, f"evaluate failed: {str(exc).split(':', 1)[0]}"
        return None, last_error

    # ----- reload ---------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config and replace the workers; connections stay open. On any error the
        running configuration stays in force."""
        with self._reload_lock:
            assert self.holder is not None
            try:
                config = load_config(self.config_path, self.overrides)
                settings = Settings.from_config(config)
                # A broken rule file must not reach the workers (there it would only disable
                # the rules check): refuse the reload and keep the running rule set.
                if config.section("rules")["enabled"]:
                    load_rule_set(config)
            except TrustmilterError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                return False
            new_socket = str(config.section("milter")["socket"])
            if new_socket != self.socket_spec:
                log.warning("milter.socket changed to %s: takes effect at the next restart",
                            new_socket)
            pool = self._new_pool(config, self.holder.pool.generation + 1)
            try:
                pool.warm_up()
            except Exception as exc:  # noqa: BLE001 - a worker could not build its engine
                log.error("reload failed, keeping the running configuration: workers could "
                          "not start: %s: %s", type(exc).__name__, exc)
                pool.shutdown(wait=False)
                return False
            # A check the new workers could not set up (a model file missing or corrupt, a
            # database gone) that the running ones did not lack: refuse and keep the running
            # workers rather than filter on without it, as for a broken rule file. At start there
            # is nothing to keep: the milter runs with the check disabled (an ERROR per worker).
            lost = {name: why for name, why in pool.broken_checks.items()
                    if name not in self.holder.pool.broken_checks}
            if lost:
                log.error("reload failed, keeping the running configuration: the new workers "
                          "could not set up: %s",
                          "; ".join(f"{name}: {why}" for name, why in sorted(lost.items())))
                pool.shutdown(wait=False)
                return False
            self.config, self.settings = config, settings
            old = self.holder.swap(pool)
            log.info("reloaded %s: %d workers (generation %d)",
                     self.config_path or "<defaults>", pool.size, pool.generation)
        old.shutdown(wait=True)   # messages already handed to the old workers finish there
        return True

    def _control_loop(self, read_fd: int) -> None:
        """Signals arrive here as bytes on the wakeup pipe, from whichever thread took them."""
        while True:
            try:
                data = os.read(read_fd, 64)
            except InterruptedError:
                continue
            if not data:
                return
            for signum in data:
                if signum == RELOAD_SIGNAL:
                    log.info("SIGUSR1: reloading")
                    try:
                        self.reload()
                    except Exception:  # noqa: BLE001 - never let the control thread die
                        log.exception("reload failed")
                elif signum in STOP_SIGNALS:
                    log.info("%s: stopping once the connections in progress end",
                             signal.Signals(signum).name)
                    libmilter.stop()

    def _install_signals(self) -> int:
        """Handlers that only wake the control thread (see the module docstring); returns the
        pipe's read end."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS | {RELOAD_SIGNAL}:
            signal.signal(signum, lambda *_: None)
        return read_fd

    # ----- main loop ------------------------------------------------------------------------
    def _open_socket(self) -> None:
        milter_section = self.config.section("milter")
        path = socket_path(self.socket_spec)
        if path is not None:
            directory = os.path.dirname(path) or "."
            self._created_socket_dir = not os.path.isdir(directory)
            os.makedirs(directory, exist_ok=True)
        old_umask = os.umask(0o177)   # no window in which the socket is more open than asked
        try:
            libmilter.opensocket(True)   # True: remove a stale socket left by a crash
        finally:
            os.umask(old_umask)
        port = inet_port(self.socket_spec)
        if port is not None and not set_listener_nodelay(port):
            log.warning("could not set TCP_NODELAY on the milter socket")
        if path is not None:
            uid, gid = parse_owner(str(milter_section["socket_owner"]))
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid)
            os.chmod(path, int(str(milter_section["socket_mode"]), 8))

    def _become_user(self) -> None:
        """Root opened the socket; everything after (forkserver, workers, state writer) runs as
        milter.user. Without one, running as root is only warned about."""
        spec = str(self.config.section("milter")["user"])
        if os.geteuid() != 0:
            return
        if not spec:
            log.warning("running as root: set milter.user (or --user) so that nothing that reads "
                        "mail runs as root")
            return
        uid, gid, name = resolve_user(spec)
        state = str(self.config.get("state.dir") or "")
        if state:
            os.makedirs(state, mode=0o700, exist_ok=True)
        log_file = str(self.config.section("milter")["log_file"])
        path = socket_path(self.socket_spec)
        own = [p for p in (state, log_file) if p]
        if path is not None and self._created_socket_dir:
            own.append(os.path.dirname(path))   # so that we can remove the socket at exit
        drop_privileges(uid, gid, name, own)
        log.info("running as user %s (uid %d, gid %d)", name, uid, gid)

    def run(self) -> int:
        # 0. As root: open the socket, then become milter.user before anything else starts.
        TrustMilter.server = self
        Milter.factory = TrustMilter
        self._register()
        try:
            self._open_socket()
        except (libmilter.error, OSError) as exc:
            raise TrustmilterError(f"cannot listen on {self.socket_spec}: {exc}") from None
        try:
            self._become_user()
        except BaseException:
            self._remove_socket()
            raise
        # 1. Processes that must not inherit a blocked mask, before blocking.
        self._mp_context = prepare_context()
        # 2. Handlers first (a thread that already exists may take a signal at any moment), then
        #    block the signals in this thread before any thread or pool of ours exists: every
        #    later thread inherits the mask, so libmilter's signal thread (sigwait on HUP/TERM/
        #    INT) or, through the wakeup pipe, our control thread handles them.
        read_fd = self._install_signals()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {RELOAD_SIGNAL})
        try:
            self.recorder = StateRecorder(self.config)
        except Exception as exc:  # noqa: BLE001 - state is an aid: filtering goes on without it
            log.error("history/reputation/quarantine index unavailable: %s: %s",
                      type(exc).__name__, exc)
        try:
            self.start_pool()
        except Exception as exc:  # noqa: BLE001
            self._remove_socket()
            raise TrustmilterError(f"worker processes could not start: {type(exc).__name__}: "
                                   f"{exc} (see the log above)") from None
        assert self.holder is not None
        threading.Thread(target=self._control_loop, args=(read_fd,), name="control",
                         daemon=True).start()
        log.info("listening on %s (authserv-id %s)", self.socket_spec, self.settings.authserv_id)
        try:
            libmilter.main()   # returns on SIGTERM/SIGINT/SIGHUP after connections end
        finally:
            log.info("stopping: waiting for the workers")
            self.holder.pool.shutdown(wait=True)
            if self.recorder is not None:
                self.recorder.close(10)
            self._remove_socket()
            log.info("stopped")
        return 0

    def _remove_socket(self) -> None:
        path = socket_path(self.socket_spec)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except PermissionError:   # a directory we may not write in after the switch
                log.warning("could not remove the socket %s: permission denied", path)

    def _register(self) -> None:
        """What Milter.runmilter does, minus opening the socket (we set its owner and mode)."""
        libmilter.set_connect_callback(Milter.connect_callback)
        libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
        libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
        libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
        libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
        libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
        libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
        libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
        libmilter.set_close_callback(Milter.close_callback)
        libmilter.setconn(self.socket_spec)
        libmilter.register(MILTER_NAME, data=lambda ctx: ctx.getpriv().data(),
                           unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                           negotiate=Milter.negotiate_callback)


# ---- command line -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.resolver:
        overrides.setdefault("dns", {})["server"] = args.resolver
    milter_over: dict[str, Any] = {}
    if args.socket:
        milter_over["socket"] = args.socket
    if args.workers is not None:
        milter_over["workers"] = args.workers
    if args.log_file is not None:
        milter_over["log_file"] = args.log_file
    if args.log_format:
        milter_over["log_format"] = args.log_format
    if args.user is not None:
        milter_over["user"] = args.user
    if milter_over:
        overrides["milter"] = milter_over
    config_path = resolve_config_path(args.config)
    config = load_config(config_path, overrides)
    Settings.from_config(config)   # validate before anything starts
    if str(config.section("milter")["user"]) and os.geteuid() == 0:
        resolve_user(str(config.section("milter")["user"]))   # a typo fails now, not later
    log_setup = {"log_file": str(config.section("milter")["log_file"]),
                 "level": logging.DEBUG if getattr(args, "verbose", False) else logging.INFO}
    setup_logging(**log_setup)
    server = MilterServer(config_path, overrides, config, log_setup)
    return server.run()


def register_cli(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the milter for Postfix or Sendmail",
        description="Run the milter. Stop: SIGTERM (finishes messages in flight). Reload config "
                    "and rules without dropping connections: SIGUSR1 (systemctl reload).")
    serve.add_argument("--config", help=f"local config file (default: {DEFAULT_CONFIG_PATH} "
                                        "if it exists, else the shipped defaults)")
    serve.add_argument("--socket", metavar="unix:PATH|inet:PORT@HOST",
                       help="where to listen (default: config milter.socket)")
    serve.add_argument("--resolver", metavar="HOST[:PORT]", help="DNS resolver to use")
    serve.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: config milter.workers; 0 = 2 per core)")
    serve.add_argument("--log-file", default=None, help="log file (default: standard error)")
    serve.add_argument("--log-format", choices=("text", "json"), default=None,
                       help="per-message log line format (default: config milter.log_format)")
    serve.add_argument("--user", default=None, metavar="USER[:GROUP]",
                       help="when started as root, become this user once the socket is open "
                            "(default: config milter.user)")
    serve.set_defaults(func=cmd_serve)


__all__ = ["MilterServer", "Settings", "TrustMilter", "clean_text", "cmd_serve", "fold",
           "format_log_line", "register_cli", "reply_codes", "smtp_text"]
