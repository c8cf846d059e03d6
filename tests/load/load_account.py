"""Accounting for every message of a load run, from three independent sources:

- what the sender saw (the client's attempts and replies, with the queue id of a 250),
- what the MTA did (the Maildir's delivered copies; Postfix's hold queue),
- what the milter recorded (its SQLite history, read with ``trustmilter history --json``).

A message is *delivered* (exactly one copy in the Maildir, with exactly one Authentication-Results
of ours and no forged one), *held* (in the hold queue exactly once) or *rejected* (the sender saw
a 5xx); a 4xx is retried by the client and the message ends in one of those. Everything else is
lost. The history must hold exactly one final verdict per message whose action matches its fate:
inbox/junk -> delivered, quarantine -> held, reject -> rejected (tempfail verdicts only before a
retry, never more than the sender saw 4xx replies).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from load_mail import AUTHSERV, EXPECTED, FORGED_MARK, OTHER_AUTHSERV, message_id_of

FATE_OF_ACTION = {"inbox": "delivered", "junk": "delivered", "quarantine": "held",
                  "reject": "rejected"}


# ---- the MTA side -------------------------------------------------------------------------------
@dataclass
class Copy:
    """What the accounting needs from one delivered file's header."""

    path: str
    our_authres: int            # Authentication-Results headers claiming our authserv-id
    other_authres: int          # ... claiming OTHER_AUTHSERV (the forged_ar messages' honest one)
    forged_seen: bool           # FORGED_MARK anywhere in the header: a forgery survived
    spam_flag: str              # X-Spam-Flag value ("" when absent)


def header_fields(head: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field in a header block."""
    out: list[tuple[str, str]] = []
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"))
        elif b":" in line:
            name, _, value = line.partition(b":")
            out.append((name.strip().lower().decode("ascii", "replace"),
                        value.strip().decode("utf-8", "replace")))
    return out


def read_head(path: Path, limit: int = 262144) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(limit)
    end = data.find(b"\n\n")
    crlf = data.find(b"\r\n\r\n")
    if end < 0 or (0 <= crlf < end):
        end = crlf
    return data if end < 0 else data[:end]


class MaildirIndex:
    """Message-ID -> delivered copies, read incrementally (a file is read once)."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.seen: set[str] = set()
        self.copies: dict[str, list[Copy]] = defaultdict(list)
        self.without_id: list[str] = []

    def scan(self) -> None:
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name in self.seen:
                    continue
                self.seen.add(path.name)
                head = read_head(path)
                msgid = message_id_of(head)
                if msgid is None:
                    self.without_id.append(str(path))
                    continue
                fields = header_fields(head)
                authres = [v for n, v in fields if n == "authentication-results"]
                ours = sum(1 for v in authres if v.split(";")[0].strip().lower() == AUTHSERV)
                other = sum(1 for v in authres if v.split(";")[0].strip().lower() == OTHER_AUTHSERV)
                flag = next((v for n, v in fields if n == "x-spam-flag"), "")
                self.copies[msgid].append(Copy(str(path), ours, other,
                                               FORGED_MARK.encode() in head, flag.strip()))


def hold_index(postqueue_json: list[dict[str, Any]],
               postcat: Callable[[list[str]], str]) -> dict[str, list[str]]:
    """Message-ID -> queue ids of the messages in Postfix's hold queue. ``postcat(ids)`` returns
    ``postcat -ehq`` output for those queue ids (each file's sections start with a line
    "*** ENVELOPE RECORDS hold/ID ***" and the like)."""
    held = [m["queue_id"] for m in postqueue_json if m.get("queue_name") == "hold"]
    out: dict[str, list[str]] = defaultdict(list)
    for start in range(0, len(held), 200):
        batch = held[start:start + 200]
        current: str | None = None
        named: set[str] = set()          # queue ids whose Message-ID was found
        text = postcat(batch)
        for line in text.splitlines():
            if line.startswith("*** "):
                found = re.search(r"/([0-9A-Za-z]+) \*\*\*$", line)
                if found and found.group(1) != current:
                    current = found.group(1)
                continue
            if current is not None and current not in named and re.match(r"(?i)message-id:",
                                                                         line):
                msgid = message_id_of(line.encode())
                if msgid is not None:
                    out[msgid].append(current)
                    named.add(current)
        missing = set(batch) - named
        if missing:
            out["(no Message-ID)"] += sorted(missing)
    return out


# ---- the milter side ----------------------------------------------------------------------------
def read_history(config: Path, since: float) -> list[dict[str, Any]]:
    """Every history entry from ``since`` on, through the CLI (a black box: the milter's own
    reader of its database)."""
    import datetime as dt
    when = dt.datetime.fromtimestamp(since).isoformat(timespec="seconds")
    res = subprocess.run([sys.executable, "-m", "trustmilter.cli", "history", "--json",
                          "--config", str(config), "--since", when, "-n", "100000000"],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        if "no history recorded yet" in res.stderr:
            return []
        raise RuntimeError(f"trustmilter history failed ({res.returncode}): {res.stderr[-2000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def wait_for_history(config: Path, since: float, expected: set[str], timeout: float = 300.0,
                     quiet: float = 30.0) -> tuple[list[dict[str, Any]], float]:
    """Poll the history until every Message-ID in ``expected`` has a final verdict, or until
    nothing new was written for ``quiet`` seconds (then what is missing is missing), or
    ``timeout``. Returns (entries, seconds waited)."""
    t0 = time.monotonic()
    last_count, last_change = -1, t0
    while True:
        entries = read_history(config, since)
        final = {e["message_id"] for e in entries if e["action"] != "tempfail"}
        now = time.monotonic()
        if expected <= final:
            return entries, now - t0
        if len(entries) != last_count:
            last_count, last_change = len(entries), now
        if now - last_change > quiet or now - t0 > timeout:
            return entries, now - t0
        time.sleep(2.0)


# ---- reconciliation -----------------------------------------------------------------------------
@dataclass
class Accounting:
    sent: int = 0
    fates: Counter[str] = field(default_factory=Counter)        # delivered / held / rejected
    actions: Counter[str] = field(default_factory=Counter)      # final history action
    by_category: dict[str, Counter[str]] = field(default_factory=dict)
    replies_4xx: int = 0                  # 4xx replies the senders saw (each one retried)
    replies_lost: int = 0                 # connections lost before a final reply (retried)
    retried_messages: int = 0             # messages that needed more than one attempt
    tempfail_verdicts: int = 0            # history entries with action tempfail
    lost: list[str] = field(default_factory=list)          # "<msgid>: why"
    problems: list[str] = field(default_factory=list)      # accounted, but something is wrong

    @property
    def accounted(self) -> int:
        return sum(self.fates.values())

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "accounted": self.accounted, "lost": len(self.lost),
                "fates": dict(self.fates), "actions": dict(self.actions),
                "by_category": {k: dict(v) for k, v in sorted(self.by_category.items())},
                "replies_4xx": self.replies_4xx, "replies_lost_connection": self.replies_lost,
                "retried_messages": self.retried_messages,
                "tempfail_verdicts": self.tempfail_verdicts,
                "lost_messages": self.lost[:200], "problems": self.problems[:200],
                "problem_count": len(self.problems)}


def reconcile(planned: dict[str, str], results: Iterable[dict[str, Any]],
              copies: dict[str, list[Copy]], held: dict[str, list[str]],
              history: Iterable[dict[str, Any]]) -> Accounting:
    """``planned``: Message-ID -> category of every message the run meant to send."""
    acc = Accounting(sent=len(planned))
    by_id = {r["msgid"]: r for r in results}
    verdicts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in history:
        verdicts[entry["message_id"]].append(entry)
    for msgid, category in planned.items():
        result = by_id.get(msgid)
        if result is None:
            acc.lost.append(f"{msgid}: no result from its client process")
            continue
        codes = [a["code"] for a in result["attempts"]]
        n4xx = sum(1 for c in codes if 400 <= c < 500)
        nlost = sum(1 for c in codes if c == 0)
        acc.replies_4xx += n4xx
        acc.replies_lost += nlost
        acc.retried_messages += len(codes) > 1
        mine = verdicts.get(msgid, [])
        final = [v for v in mine if v["action"] != "tempfail"]
        temps = len(mine) - len(final)
        acc.tempfail_verdicts += temps
        got = copies.get(msgid, [])
        hq = held.get(msgid, [])
        last = result["attempts"][-1]["reply"] if result["attempts"] else "no attempt"

        fate = ""
        if result["final"] == "accepted":
            if len(got) == 1 and not hq:
                fate = "delivered"
            elif len(hq) == 1 and not got:
                fate = "held"
            elif not got and not hq:
                acc.lost.append(f"{msgid}: accepted ({last}) but neither delivered nor held")
                continue
            else:
                fate = "delivered" if got else "held"
                acc.problems.append(f"{msgid}: {len(got)} delivered copies and {len(hq)} held")
        elif result["final"] == "rejected":
            fate = "rejected"
            if got or hq:
                acc.problems.append(f"{msgid}: refused ({last}) yet {len(got)} delivered, "
                                    f"{len(hq)} held")
        else:
            acc.lost.append(f"{msgid}: {result['final'] or 'unresolved'} after {len(codes)} "
                            f"attempt(s), last reply {last}")
            continue
        acc.fates[fate] += 1

        # The milter's record of it.
        if len(final) != 1:
            acc.problems.append(f"{msgid}: {len(final)} final verdicts in the history "
                                f"({[v['action'] for v in final]}), fate {fate}")
        if temps > n4xx + nlost:
            acc.problems.append(f"{msgid}: {temps} tempfail verdicts in the history but the "
                                f"sender saw {n4xx} 4xx replies")
        action = final[-1]["action"] if final else "(none)"
        acc.actions[action] += 1
        acc.by_category.setdefault(category, Counter())[action] += 1
        if final and FATE_OF_ACTION.get(action) != fate:
            acc.problems.append(f"{msgid}: history says {action}, the message was {fate} "
                                f"({last})")
        if final and fate != "rejected" and final[-1]["queue_id"] != result["queue_id"]:
            acc.problems.append(f"{msgid}: history queue id {final[-1]['queue_id']!r}, the "
                                f"sender was told {result['queue_id']!r}")
        allowed = EXPECTED.get(category)
        if final and allowed is not None and action not in allowed:
            acc.problems.append(f"{msgid}: {category} got {action}, expected one of "
                                f"{sorted(allowed)}")
        if category == "tempfail_once" and n4xx == 0:
            acc.problems.append(f"{msgid}: tempfail_once was never answered 4xx")

        # The delivered copy: our header once, no forgery left, junk marked as junk.
        if fate == "delivered":
            copy = got[0]
            if copy.our_authres != 1:
                acc.problems.append(f"{msgid}: {copy.our_authres} Authentication-Results "
                                    f"claiming {AUTHSERV} in {copy.path}")
            if copy.forged_seen:
                acc.problems.append(f"{msgid}: forged Authentication-Results survived in "
                                    f"{copy.path}")
            if category == "forged_ar" and copy.other_authres != 1:
                acc.problems.append(f"{msgid}: {OTHER_AUTHSERV}'s Authentication-Results "
                                    f"removed ({copy.other_authres} left)")
            if action == "junk" and copy.spam_flag.upper() != "YES":
                acc.problems.append(f"{msgid}: junk verdict but X-Spam-Flag "
                                    f"{copy.spam_flag!r} in {copy.path}")
            if action == "inbox" and copy.spam_flag.upper() == "YES":
                acc.problems.append(f"{msgid}: inbox verdict but X-Spam-Flag: YES")
    return acc
