"""One SMTP client process of the load test (the runner starts several, so the client side is
not bound by one GIL):

    python tests/load/load_client.py SPEC.json RESULTS.json

It builds its share of the messages from the plan in SPEC.json, prints ``READY``, waits for
``GO`` on standard input, then sends with ``threads`` concurrent SMTP sessions. Each session
takes a planned connection, presents the planned client address and HELO with XCLIENT, and sends
that connection's messages (MAIL, RCPT, DATA) one after the other; with a rate, connections
start on a schedule (open loop) instead of as soon as a session is free. A 4xx (or a connection
lost before the final reply) is retried like an MTA would, later and on a new connection, with a
compressed back-off (1, 2, 4, 8 s: real MTAs wait minutes); a 5xx is final. It writes every
attempt of every message to RESULTS.json and exits.
"""
from __future__ import annotations

import heapq
import json
import re
import resource
import smtplib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent, HERE.parent / "integration"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from load_mail import Connection, KeySet, MessageSpec, Profile, Writer  # noqa: E402
from postfix import xclient  # noqa: E402

BACKOFF = (1.0, 2.0, 4.0, 8.0)     # seconds before retry 1, 2, 3, 4+
MAX_ATTEMPTS = 10                   # then the client gives up (a lost message for the runner)
SMTP_TIMEOUT = 330.0                # above Postfix's milter_content_timeout (300 s)
_QUEUED = re.compile(r"queued as ([0-9A-Za-z]+)")


@dataclass
class Outgoing:
    spec: MessageSpec
    profile: Profile
    sender: str
    raw: bytes
    attempts: list[dict[str, Any]] = field(default_factory=list)
    final: str = ""                 # accepted | rejected | gave-up
    queue_id: str = ""

    def result(self) -> dict[str, Any]:
        return {"msgid": self.spec.msgid, "category": self.spec.category, "size": len(self.raw),
                "mail_from": self.sender, "client_ip": self.profile.ip,
                "attempts": self.attempts, "final": self.final, "queue_id": self.queue_id}


class Client:
    def __init__(self, port: int, threads: int, connections: list[list[Outgoing]],
                 rate: float = 0.0) -> None:
        self.port = port
        self.threads = threads
        self.rate = rate                # messages/s this process offers (0: as fast as it can)
        self._next_start: float | None = None
        self.pending: deque[list[Outgoing]] = deque(connections)
        self.retries: list[tuple[float, int, Outgoing]] = []   # (due, tiebreak, message)
        self.unresolved = sum(len(c) for c in connections)
        self.cond = threading.Condition()
        self.connections_made = 0
        self.connect_errors: list[str] = []
        self._tiebreak = 0

    # ---- scheduling -----------------------------------------------------------------------
    def next_job(self) -> list[Outgoing] | None:
        """The next connection's messages: a retry that is due, else a planned connection (at
        its time when a rate is set); None when every message is resolved."""
        with self.cond:
            while True:
                now = time.monotonic()
                if self.retries and self.retries[0][0] <= now:
                    return [heapq.heappop(self.retries)[2]]
                if self.pending and self.rate:
                    if self._next_start is None:
                        self._next_start = now
                    if self._next_start <= now:
                        job = self.pending.popleft()
                        # Open loop: the schedule does not wait for replies; a backlog of more
                        # than a second (all sessions busy) is not made up in a burst.
                        self._next_start = max(self._next_start, now - 1.0) + len(job) / self.rate
                        return job
                    due = min([self._next_start] + [r[0] for r in self.retries[:1]])
                    self.cond.wait(max(0.001, due - now))
                    continue
                if self.pending:
                    return self.pending.popleft()
                if self.unresolved == 0:
                    self.cond.notify_all()
                    return None
                wait = self.retries[0][0] - now if self.retries else 0.5
                self.cond.wait(max(0.01, min(wait, 0.5)))

    def resolve(self, msg: Outgoing, final: str) -> None:
        msg.final = final
        with self.cond:
            self.unresolved -= 1
            self.cond.notify_all()

    def retry_later(self, msg: Outgoing, counted: bool = True) -> None:
        """Send ``msg`` again later; ``counted``: it was attempted (a 4xx or a lost reply)."""
        tries = len(msg.attempts)
        if counted and tries >= MAX_ATTEMPTS:
            self.resolve(msg, "gave-up")
            return
        delay = BACKOFF[min(max(tries - 1, 0), len(BACKOFF) - 1)] if counted else 0.2
        with self.cond:
            self._tiebreak += 1
            heapq.heappush(self.retries, (time.monotonic() + delay, self._tiebreak, msg))
            self.cond.notify_all()

    # ---- sending --------------------------------------------------------------------------
    def session(self) -> None:
        while True:
            job = self.next_job()
            if job is None:
                return
            self.send_connection(job)

    def send_connection(self, batch: list[Outgoing]) -> None:
        profile = batch[0].profile
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.load.test",
                                timeout=SMTP_TIMEOUT)
            xclient(smtp, profile.ip, profile.helo, name=profile.name)
        except (OSError, smtplib.SMTPException) as exc:
            with self.cond:
                self.connect_errors.append(f"{type(exc).__name__}: {exc}")
            for msg in batch:                 # not attempted: try again soon
                self.retry_later(msg, counted=False)
            return
        with self.cond:
            self.connections_made += 1
        rest = list(batch)
        try:
            while rest:
                msg = rest.pop(0)
                code, reply, ms, lost = self.transaction(smtp, msg)
                msg.attempts.append({"t": time.time(), "code": code, "reply": reply[:300],
                                     "ms": round(ms, 2)})
                if 200 <= code < 300:
                    found = _QUEUED.search(reply)
                    msg.queue_id = found.group(1) if found else ""
                    self.resolve(msg, "accepted")
                elif 500 <= code < 600:
                    self.resolve(msg, "rejected")
                else:                          # 4xx, or the connection went away (code 0)
                    self.retry_later(msg)
                if lost or code == 421:
                    break
                if code >= 400:
                    try:
                        smtp.rset()
                    except (OSError, smtplib.SMTPException):
                        break
            for other in rest:              # the connection is gone: the rest go again
                self.retry_later(other, counted=False)
        finally:
            try:
                smtp.quit()
            except Exception:  # noqa: BLE001 - closing a broken connection
                smtp.close()

    @staticmethod
    def transaction(smtp: smtplib.SMTP, msg: Outgoing) -> tuple[int, str, float, bool]:
        """MAIL, RCPT, DATA: (code, reply text, milliseconds, connection lost). The time is the
        transaction as the sender sees it: MAIL FROM to the final reply after the dot."""
        t0 = time.perf_counter()
        try:
            code, reply = smtp.mail(msg.sender)
            if code == 250:
                code, reply = smtp.rcpt(msg.spec.rcpt)
                if code in (250, 251):
                    code, reply = smtp.data(msg.raw)
            lost = False
        except smtplib.SMTPServerDisconnected as exc:
            code, reply, lost = 0, f"connection lost: {exc}", True
        except smtplib.SMTPResponseException as exc:   # data(): no 354
            code, reply, lost = exc.smtp_code, exc.smtp_error, exc.smtp_code == 421
        except OSError as exc:
            code, reply, lost = 0, f"connection lost: {type(exc).__name__}: {exc}", True
        except Exception as exc:  # noqa: BLE001 - a client bug: retried, then reported
            code, reply, lost = 0, f"client error: {type(exc).__name__}: {exc}", True
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        return code, f"{code} {text}".replace("\n", " "), (time.perf_counter() - t0) * 1000, lost

    def run(self) -> float:
        threads = [threading.Thread(target=self.session, name=f"session-{n}")
                   for n in range(self.threads)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    writer = Writer(KeySet.from_json(spec["keys"]), seed=spec.get("prose_seed", 7))
    connections: list[list[Outgoing]] = []
    for data in spec["connections"]:
        conn = Connection.from_json(data)
        batch = []
        for m in conn.messages:
            sender, raw = writer.build(m)
            batch.append(Outgoing(m, conn.profile, sender, raw))
        connections.append(batch)
    messages = [m for batch in connections for m in batch]
    client = Client(int(spec["port"]), int(spec["threads"]), connections,
                    rate=float(spec.get("rate", 0.0)))
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 2
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    wall = client.run()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    Path(argv[1]).write_text(json.dumps({
        "started": started, "wall_s": wall,
        "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
        "connections": client.connections_made, "connect_errors": client.connect_errors,
        "messages": [m.result() for m in messages],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
