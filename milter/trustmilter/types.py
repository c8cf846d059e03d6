"""The typed vocabulary shared by every stage: envelope in, symbols through, verdict out."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Action(str, enum.Enum):
    """What happens to the message; ordered from mildest to strongest."""

    INBOX = "inbox"
    JUNK = "junk"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"

    @property
    def rank(self) -> int:
        return _ACTION_RANK[self]


_ACTION_RANK = {Action.INBOX: 0, Action.JUNK: 1, Action.QUARANTINE: 2, Action.TEMPFAIL: 3,
                Action.REJECT: 4}


class AuthStatus(str, enum.Enum):
    """Result values of RFC 8601 / RFC 7208 / RFC 6376 / RFC 7489 / RFC 8617, typed end to end so a
    temperror can never become a fail by accident."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"
    POLICY = "policy"


@dataclass(frozen=True)
class Envelope:
    """What the MTA told us about the SMTP transaction (or what ``scan`` assumed).

    ``client_ip`` is None when unknown (then IP-based checks report ``none``).
    ``mail_from`` is the bare address without angle brackets; "" is the null sender.
    """

    client_ip: str | None = None
    client_name: str | None = None      # the MTA's verified reverse name, if it told us
    helo: str | None = None
    mail_from: str = ""
    rcpt_to: tuple[str, ...] = ()
    queue_id: str | None = None
    auth_user: str | None = None        # {auth_authen}: an authenticated submission
    daemon_name: str | None = None
    mta_hostname: str | None = None     # macro j
    assumptions: tuple[str, ...] = ()   # what scan inferred, said to the user


@dataclass(frozen=True)
class Symbol:
    """A named signal. Every check speaks in symbols; the verdict is their sum."""

    name: str
    score: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": round(self.score, 3), "reason": self.reason}


@dataclass
class Verdict:
    """The outcome of ``pipeline.evaluate``: everything the milter needs to act, nothing more."""

    action: Action
    score: float
    symbols: list[Symbol]
    authentication_results: str          # header value (no field name) we add
    reason: str = ""                     # SMTP reply text for reject/tempfail, or why
    smtp_code: str | None = None         # e.g. "550", "451"
    smtp_xcode: str | None = None        # e.g. "5.7.1"
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    subject_tag: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    elapsed_ms: float = 0.0
    assumptions: tuple[str, ...] = ()
    identities: dict[str, Any] = field(default_factory=dict)
    intended: Action | None = None       # the action before shadow mode; None = same as action

    def symbol_names(self) -> list[str]:
        return [s.name for s in self.symbols]

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "score": round(self.score, 3),
            "symbols": [s.as_dict() for s in self.symbols],
            "authentication_results": self.authentication_results,
            "reason": self.reason,
            "elapsed_ms": round(self.elapsed_ms, 2),
        }
