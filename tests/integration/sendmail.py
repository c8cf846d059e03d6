"""A real Sendmail 8.17 for the tests, beside Postfix, without installing it (Debian's sendmail
packages conflict with postfix): the .debs are fetched with ``apt-get download``, unpacked with
``dpkg -x`` into a cache folder, and the binary runs as root from there with a .cf built by m4 from
our own .mc. Recipe and traps: ../shared/PITFALLS.md ("Sendmail beside Postfix").

Every path (queue, pid, aliases, statistics, help, service switch) lives under the instance's
folder; it listens on 127.0.0.1 on its own port and relays everything to a sink (a Postfix
instance with a Maildir) with SMART_HOST + ``TCP $h PORT`` mailer args.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postfix import free_port, wait_for_port

PACKAGES = ("sendmail-bin", "sendmail-base", "sendmail-cf", "m4", "libwrap0")
CACHE = Path(os.environ.get("TRUSTMILTER_SENDMAIL_CACHE",
                            Path(tempfile.gettempdir()) / "trustmilter-sendmail"))
HOSTNAME = "sm.test.example"


def _unpacked() -> Path:
    return CACHE / "root"


def ensure_sendmail() -> Path:
    """Download and unpack the packages once (cached); returns the unpacked root."""
    root = _unpacked()
    binary = root / "usr/libexec/sendmail/sendmail"
    if binary.exists() and (root / "usr/share/sendmail/cf/m4/cf.m4").exists():
        return root
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    # apt's sandbox user must be able to write there; -o avoids its warning when it cannot.
    os.chmod(CACHE, 0o755)
    os.chmod(debs, 0o777)
    res = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        res = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True,
                             text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(PACKAGES)} failed: {res.stderr[-2000:]}")
    tmp_root = CACHE / "root.tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp_root)], check=True, timeout=120)
    shutil.rmtree(root, ignore_errors=True)
    tmp_root.rename(root)
    return root


def sendmail_available() -> str | None:
    """None when a Sendmail can be run here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "running Sendmail needs root"
    for tool in ("apt-get", "dpkg", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    # Sendmail sleeps 60 s at every start when the host name has no dot; we give it one in its
    # own UTS namespace, which needs CAP_SYS_ADMIN (root, not in an unprivileged container).
    probe = subprocess.run(["unshare", "-u", "sh", "-c", f"hostname {HOSTNAME}"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -u (a UTS namespace for Sendmail's host name) failed: {probe.stderr}"
    try:
        ensure_sendmail()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"could not fetch Sendmail's Debian packages: {exc}"
    return None


MC = """\
divert(-1)dnl
# trustmilter test instance: everything under {base}
divert(0)dnl
VERSIONID(`trustmilter test')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{hostname}')dnl
define(`QUEUE_DIR', `{base}/mqueue')dnl
define(`confPID_FILE', `{base}/sendmail.pid')dnl
define(`ALIAS_FILE', `{base}/aliases')dnl
define(`STATUS_FILE', `{base}/statistics')dnl
define(`HELP_FILE', `{base}/helpfile')dnl
define(`confSERVICE_SWITCH_FILE', `{base}/service.switch')dnl
define(`confCW_FILE', `-o {base}/local-host-names')dnl
define(`confCT_FILE', `-o {base}/trusted-users')dnl
define(`confHOST_STATUS_DIRECTORY', `')dnl
define(`confDEF_USER_ID', `65534:65534')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit,GroupWritableDirPathSafe,GroupReadableKeyFile')dnl
define(`confLOG_LEVEL', `9')dnl
define(`confMILTER_LOG_LEVEL', `6')dnl
define(`confREFUSE_LA', `200')dnl
define(`confQUEUE_LA', `200')dnl
define(`confDELAY_LA', `0')dnl
define(`confMAX_DAEMON_CHILDREN', `0')dnl
define(`confCONNECTION_RATE_THROTTLE', `0')dnl
define(`confTO_IDENT', `0s')dnl
define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl
# Else 127.0.0.1 joins class w and SMART_HOST [127.0.0.1] counts as ourselves (no relaying).
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confPRIVACY_FLAGS', `authwarnings')dnl
define(`SMART_HOST', `[127.0.0.1]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`SMTP8_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`DSMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`promiscuous_relay')dnl
DAEMON_OPTIONS(`Port={port}, Addr=127.0.0.1, Name=MTA')dnl
INPUT_MAIL_FILTER(`trustmilter', `S={milter}, F=T, T=C:10s;S:30s;R:60s;E:5m')dnl
MAILER(`smtp')dnl
"""


@dataclass
class SendmailInstance:
    """One Sendmail daemon on 127.0.0.1:port relaying to 127.0.0.1:sink_port."""

    base: Path
    sink_port: int
    milter: str                     # libmilter socket spec, e.g. "unix:/tmp/x/tm.sock"
    port: int = 0
    hostname: str = HOSTNAME
    proc: subprocess.Popen[bytes] | None = None
    root: Path = field(default_factory=_unpacked)

    @classmethod
    def create(cls, sink_port: int, milter: str) -> "SendmailInstance":
        base = Path(tempfile.mkdtemp(prefix="tm-sm-", dir="/tmp"))
        os.chmod(base, 0o755)
        inst = cls(base=base, sink_port=sink_port, milter=milter, port=free_port(),
                   root=ensure_sendmail())
        inst.build()
        return inst

    @property
    def cf(self) -> Path:
        return self.base / "sendmail.cf"

    @property
    def queue_dir(self) -> Path:
        return self.base / "mqueue"

    @property
    def binary(self) -> Path:
        return self.base / "sendmail"

    def _env(self) -> dict[str, str]:
        return dict(os.environ, LD_LIBRARY_PATH=str(self.root / "usr/lib/x86_64-linux-gnu"))

    def build(self) -> None:
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        (self.base / "aliases").write_text("postmaster: root\n")
        (self.base / "statistics").write_text("")
        (self.base / "helpfile").write_text("")
        (self.base / "service.switch").write_text("hosts files\naliases files\n")
        (self.base / "local-host-names").write_text("")
        (self.base / "trusted-users").write_text("")
        # The unpacked binary is setgid: the loader would ignore LD_LIBRARY_PATH (libwrap).
        shutil.copy2(self.root / "usr/libexec/sendmail/sendmail", self.binary)
        os.chmod(self.binary, 0o755)
        mc = self.base / "test.mc"
        mc.write_text(MC.format(base=self.base, hostname=self.hostname, port=self.port,
                                sink_port=self.sink_port, milter=self.milter))
        cf_dir = self.root / "usr/share/sendmail/cf"
        m4 = shutil.which("m4") or str(self.root / "usr/bin/m4")
        res = subprocess.run([m4, f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4/cf.m4"), str(mc)],
                             capture_output=True, text=True, timeout=60, env=self._env())
        if res.returncode != 0 or "Cw" not in res.stdout:
            raise RuntimeError(f"m4 failed: {res.stderr}")
        self.cf.write_text(res.stdout)
        # Aliases database (sendmail refuses to start without one it can read).
        subprocess.run(["unshare", "-u", "sh", "-c",
                        f"hostname {self.hostname} && exec {self.binary} -C {self.cf} -bi"],
                       capture_output=True, timeout=60, env=self._env())

    def start(self, timeout: float = 60.0) -> "SendmailInstance":
        # Own UTS namespace with a dotted host name: otherwise sendmail sleeps 60 s at start
        # trying to find its fully qualified name. -bD: daemon in the foreground; -X: a
        # transcript of every SMTP and milter conversation (there is no syslog here).
        cmd = ["unshare", "-u", "sh", "-c",
               f"hostname {self.hostname} && exec {self.binary} -C {self.cf} -bD "
               f"-X {self.base / 'transcript.log'} -O LogLevel=9"]
        self.stderr = open(self.base / "stderr.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.stderr, stderr=self.stderr,
                                     env=self._env(), start_new_session=True)
        try:
            wait_for_port(self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"sendmail did not start:\n{self.diagnostics()}") from None
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The daemon's children (one per connection) are in its session: stop them all.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.stderr.close()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def diagnostics(self) -> str:
        out = []
        for name in ("stderr.log", "transcript.log"):
            try:
                out.append(f"--- {name}\n" + (self.base / name).read_text(errors="replace")[-4000:])
            except FileNotFoundError:
                pass
        return "\n".join(out)

    def smtp(self, timeout: float = 60.0) -> Any:
        import smtplib
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test.example",
                            timeout=timeout)

    def release(self, queue_id: str) -> str:
        """What an admin does: unquarantine one message (-Q without a reason turns its hf file
        back into a qf file), then run it (-qI)."""
        out = ""
        for args in (f"-qQ -qI{queue_id} -Q", f"-qI{queue_id}"):
            res = subprocess.run(["unshare", "-u", "sh", "-c",
                                  f"hostname {self.hostname} && exec {self.binary} -C {self.cf} "
                                  f"{args}"],
                                 capture_output=True, text=True, timeout=60, env=self._env())
            out += res.stdout + res.stderr
        return out

    def queue_files(self) -> dict[str, str]:
        """Control files (envelope + headers) of the queued messages, by file name: qf* for
        messages waiting for delivery, hf* for quarantined ones."""
        return {p.name: p.read_text(errors="replace")
                for p in sorted(self.queue_dir.glob("[qh]f*"))}

    def quarantined(self) -> dict[str, str]:
        """Quarantined messages: Sendmail renames their qf file to hf and records the reason
        on a "q" line."""
        return {name: text for name, text in self.queue_files().items()
                if name.startswith("hf") and any(line.startswith("q")
                                                 for line in text.splitlines())}


__all__ = ["SendmailInstance", "ensure_sendmail", "sendmail_available"]
