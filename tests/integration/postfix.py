"""A real Postfix for the tests, with its own configuration, queue and data directories under a
temporary folder: ``postfix -c DIR start``. Nothing in /etc/postfix is read or written (on a fresh
CI machine Postfix is installed with "No configuration" and there is no main.cf there).

Deliveries go either to a Maildir (virtual(8) with a static map: every recipient in the test
domain lands in one Maildir the test reads) or to discard(8) (for benchmarks).

Settings that matter on these machines (see ../shared/PITFALLS.md): ``myhostname`` explicit, chroot
off in master.cf, ``maillog_file`` through postlogd (no syslog), ``smtpd_peername_lookup = no``,
``inet_protocols = ipv4``, no DNS for delivery.
"""
from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
POSTCAT = shutil.which("postcat") or "/usr/sbin/postcat"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       {chroot}       -       {smtpd_maxproc}       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       {chroot}       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")


def postfix_available() -> str | None:
    """None when a real Postfix can run here, else why not (for a skip message)."""
    if not os.path.exists(POSTFIX):
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user (the postfix package creates it)"
    return None


@dataclass
class PostfixInstance:
    """One Postfix instance under ``base``. ``milters`` is the smtpd_milters value ("" = none)."""

    base: Path
    port: int = 0
    hostname: str = "mx.test.example"
    domains: tuple[str, ...] = ("dest.test",)
    milters: str = ""
    sink: str = "maildir"                    # "maildir" | "discard" | "relay:[HOST]:PORT"
    extra_main: dict[str, str] = field(default_factory=dict)
    smtpd_maxproc: int = 100
    chroot: bool = False                     # smtpd and cleanup chrooted (Debian's default)
    started: bool = False

    @classmethod
    def create(cls, prefix: str = "tm-pf-", **kwargs: Any) -> "PostfixInstance":
        # A short path: unix socket names are limited to 108 bytes.
        base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        os.chmod(base, 0o755)   # Postfix daemons (user postfix) traverse it
        inst = cls(base=base, **kwargs)
        if not inst.port:
            inst.port = free_port()
        inst.write_config()
        return inst

    # ----- layout ----------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base / "spool"

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def maildir(self) -> Path:
        return self.base / "mail" / "inbox"

    @property
    def log_file(self) -> Path:
        return self.base / "maillog"

    def main_cf(self) -> dict[str, str]:
        pf = pwd.getpwnam("postfix")
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": self.hostname,
            "mydomain": self.hostname.split(".", 1)[-1],
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "local_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # XCLIENT from the tests sets the client address, name and HELO the milter sees.
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_base": str(self.base / "mail"),
            # Every recipient of the test domains: one Maildir ("inbox/"; trailing slash = Maildir).
            "virtual_mailbox_maps": "static:inbox/",
            "virtual_uid_maps": f"static:{pf.pw_uid}",
            "virtual_gid_maps": f"static:{pf.pw_gid}",
            "virtual_minimum_uid": "1",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.base),
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "message_size_limit": "20480000",
            "default_process_limit": "100",
            # Fast retries: tests flush the queue themselves; no bounces while a milter is down.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "delay_warning_time": "0",
            "in_flow_delay": "0",
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "smtpd_client_connection_rate_limit": "0",
            "anvil_rate_time_unit": "60s",
        }
        if self.milters:
            settings.update({
                "smtpd_milters": self.milters,
                "non_smtpd_milters": "",
                "milter_protocol": "6",
                "milter_default_action": "tempfail",
                "milter_connect_timeout": "10s",
            })
        if self.sink == "discard":
            for key in ("default_transport", "local_transport", "relay_transport",
                        "virtual_transport"):
                settings[key] = "discard:test sink"
        elif self.sink.startswith("relay:"):
            settings["relayhost"] = self.sink[len("relay:"):]
            settings["default_transport"] = "smtp"
            settings["smtp_host_lookup"] = "native"
            settings["smtp_helo_name"] = self.hostname
        settings.update(self.extra_main)
        return settings

    def write_config(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.base / "mail"):
            d.mkdir(parents=True, exist_ok=True)
        pf = pwd.getpwnam("postfix")
        os.chown(self.base / "mail", pf.pw_uid, pf.pw_gid)
        os.chown(self.data_dir, pf.pw_uid, pf.pw_gid)
        lines = [f"{k} = {v}" for k, v in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(
            listen=f"127.0.0.1:{self.port}", smtpd_maxproc=self.smtpd_maxproc,
            chroot="y" if self.chroot else "n"))

    def set_main(self, **settings: str) -> None:
        """Change main.cf settings (and reload when running)."""
        self.extra_main.update(settings)
        self.write_config()
        if self.started:
            self._run(POSTFIX, "-c", str(self.config_dir), "reload")

    # ----- lifecycle -------------------------------------------------------------------------
    def _run(self, *cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MAIL_CONFIG=str(self.config_dir))
        res = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=60, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                               f"{res.stdout}{res.stderr}\n--- maillog:\n{self.log_tail()}")
        return res

    def start(self) -> "PostfixInstance":
        # "check" creates the queue subdirectories with the right owners, then start the master.
        self._run(POSTFIX, "-c", str(self.config_dir), "check")
        self._run(POSTFIX, "-c", str(self.config_dir), "start")
        self.started = True
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if not self.started:
            return
        self._run(POSTFIX, "-c", str(self.config_dir), "stop", check=False)
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (OSError, ValueError):
                break
            time.sleep(0.1)
        self.started = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ----- queue -----------------------------------------------------------------------------
    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (queue_name: active/deferred/hold/...)."""
        res = self._run(POSTQUEUE, "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def hold_queue(self) -> list[dict[str, Any]]:
        return [m for m in self.queue() if m.get("queue_name") == "hold"]

    def flush(self) -> None:
        """``postqueue -f``: retry every deferred message now."""
        self._run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def release_hold(self, queue_id: str = "ALL") -> None:
        self._run(POSTSUPER, "-c", str(self.config_dir), "-H", queue_id)

    def postcat(self, queue_id: str) -> str:
        return self._run(POSTCAT, "-c", str(self.config_dir), "-q", queue_id).stdout

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not [m for m in self.queue() if m.get("queue_name") != "hold"]:
                return
            time.sleep(0.2)
        raise TimeoutError(f"queue not empty after {timeout:g}s: {self.queue()}")

    # ----- delivered mail --------------------------------------------------------------------
    def delivered_files(self) -> list[Path]:
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        return sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)

    def delivered(self) -> list[bytes]:
        return [p.read_bytes() for p in self.delivered_files()]

    def find_delivered(self, message_id: str, timeout: float = 15.0) -> bytes:
        """The delivered copy whose Message-ID is ``message_id`` (waits for delivery)."""
        deadline = time.monotonic() + timeout
        needle = message_id.encode()
        while True:
            for raw in self.delivered():
                msg = email.message_from_bytes(raw, policy=email.policy.compat32)
                if (msg.get("Message-ID") or "").strip().encode() == needle:
                    return raw
            if time.monotonic() > deadline:
                raise TimeoutError(f"{message_id} not delivered after {timeout:g}s\n"
                                   f"queue: {self.queue()}\n--- maillog:\n{self.log_tail()}")
            time.sleep(0.1)

    def clear_maildir(self) -> None:
        for p in self.delivered_files():
            p.unlink()

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ----- SMTP ------------------------------------------------------------------------------
    def smtp(self, timeout: float = 30.0) -> "smtplib.SMTP":
        # local_hostname: without it smtplib calls getfqdn(), a DNS lookup (PITFALLS).
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test.example",
                            timeout=timeout)


def xclient(smtp: smtplib.SMTP, addr: str, helo: str, name: str = "[UNAVAILABLE]",
            login: str | None = None) -> None:
    """Make Postfix (and its milters) see the session as coming from ``addr`` with HELO
    ``helo``: XCLIENT, then the new EHLO the server's fresh greeting asks for. IPv6 addresses
    are given as "IPV6:2001:db8::1"."""
    smtp.ehlo_or_helo_if_needed()
    attrs = f"ADDR={addr} NAME={name} HELO={helo}"
    if login is not None:
        attrs += f" LOGIN={login}"
    code, text = smtp.docmd("XCLIENT", attrs)
    if code != 220:
        raise smtplib.SMTPResponseException(code, text)
    # The server restarted the session: forget the old EHLO and say the client's HELO name.
    smtp.helo_resp = smtp.ehlo_resp = None
    smtp.esmtp_features = {}
    code, text = smtp.ehlo(helo)
    if code != 250:
        raise smtplib.SMTPHeloError(code, text)


class MilterProcess:
    """``trustmilter serve`` as a real subprocess, with a YAML config the test writes. The log
    goes to a file; per-message lines are JSON (milter.log_format: json) so tests can read them."""

    def __init__(self, workdir: Path, config: dict[str, Any], socket_spec: str,
                 extra_args: tuple[str, ...] = (), use_config_file: bool = True) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "trustmilter.yaml"
        self.log_path = workdir / "trustmilter.log"
        self.socket_spec = socket_spec
        self.extra_args = extra_args
        self.use_config_file = use_config_file
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(config)

    def write_config(self, config: dict[str, Any]) -> None:
        import yaml
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def socket_path(self) -> str | None:
        spec = self.socket_spec
        return spec.split(":", 1)[1] if spec.startswith(("unix:", "local:")) else None

    def start(self, timeout: float = 60.0) -> "MilterProcess":
        import sys
        cmd = [sys.executable, "-m", "trustmilter.cli", "serve", "--socket", self.socket_spec]
        if self.use_config_file:
            cmd += ["--config", str(self.config_path)]
        cmd += list(self.extra_args)
        self.log_offset = len(self.log_file_text())
        self.stderr = open(self.workdir / "stderr.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.stderr, stderr=self.stderr,
                                     cwd=str(self.workdir))
        self.wait_log("listening on", timeout=timeout, since=self.log_offset)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.workdir / "stderr.log"):
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "\n".join(parts)

    def log_file_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 30.0, since: int = 0) -> str:
        """Wait for ``needle`` in the log file after character offset ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_file_text()[since:]
            if needle in text:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"trustmilter exited ({self.proc.returncode}) before "
                                   f"logging {needle!r}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{needle!r} not logged after {timeout:g}s:\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def messages(self) -> list[dict[str, Any]]:
        """The per-message log lines (JSON objects), oldest first."""
        out = []
        for line in self.log_file_text().splitlines():
            head, sep, rest = line.partition(" INFO {")
            if sep:
                try:
                    out.append(json.loads("{" + rest))
                except ValueError:
                    continue
        return out

    def message(self, queue_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.messages():
                if entry.get("queue_id") == queue_id:
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line for {queue_id}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def reload(self, config: dict[str, Any] | None = None, timeout: float = 60.0) -> None:
        """Write ``config`` (if given), send SIGUSR1, wait until the new workers are in."""
        import signal
        if config is not None:
            self.write_config(config)
        since = len(self.log_file_text())
        os.kill(self.pid, signal.SIGUSR1)
        self.wait_log("reloaded", timeout=timeout, since=since)

    def children(self) -> list[int]:
        """Processes whose parent is the milter (its forkserver, resource tracker, workers)."""
        return children_of(self.pid)

    def stop(self, sig: int | None = None, timeout: float = 30.0) -> int:
        import signal
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig if sig is not None else signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stderr.close()
        self.proc = None
        return rc


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), nearest first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry)] = int(fields[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop(0)
        kids = [p for p, pp in parents.items() if pp == current]
        out += kids
        frontier += kids
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


__all__ = ["MilterProcess", "PostfixInstance", "alive", "children_of", "free_port",
           "postfix_available", "wait_for_port", "xclient"]
