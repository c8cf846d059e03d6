"""What every check is: a module with ``NAME``, ``DEPENDS`` and ``run(ctx) -> CheckResult``.

A check reads the parsed message and envelope, uses ``ctx.dns`` for lookups, and returns
symbols (their scores come from config) plus, for authentication checks, its
Authentication-Results pieces and a typed outcome later checks may read (DMARC reads SPF/DKIM).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trustmilter.types import Action, Envelope, Symbol

if TYPE_CHECKING:
    from trustmilter.config import Config
    from trustmilter.dns import DNSSession
    from trustmilter.message import ParsedMessage
    from trustmilter.pipeline import Engine

log = logging.getLogger("trustmilter.checks")


@dataclass(frozen=True)
class ForcedAction:
    """A check's demand for an action regardless of score (e.g. DMARC p=reject)."""

    action: Action
    reason: str
    smtp_code: str | None = None    # "550"
    smtp_xcode: str | None = None   # "5.7.1"


@dataclass
class CheckResult:
    symbols: list[Symbol] = field(default_factory=list)
    authres: list[Any] = field(default_factory=list)   # authres.*AuthenticationResult
    outcome: Any = None                                # check-specific typed result
    forced: ForcedAction | None = None


@dataclass
class CheckContext:
    envelope: Envelope
    message: "ParsedMessage"
    dns: "DNSSession"
    config: "Config"
    engine: "Engine"
    results: dict[str, CheckResult] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        return self.config.section(name)

    def symbol(self, name: str, reason: str = "") -> Symbol:
        """A symbol scored from config. An unscored symbol counts 0 and is logged once."""
        score = self.config.score(name)
        if score is None:
            # <CHECK>_ERROR / _TIMEOUT report a failing check (already logged): they carry no
            # score unless an admin gives them one.
            if not name.endswith(("_ERROR", "_TIMEOUT")):
                _warn_unscored(name)
            score = 0.0
        return Symbol(name, score, reason)


_unscored: set[str] = set()


def _warn_unscored(name: str) -> None:
    if name not in _unscored:
        _unscored.add(name)
        log.warning("symbol %s has no score in config; counting 0", name)


class Check(Protocol):
    NAME: str
    DEPENDS: tuple[str, ...]
    # Optional ``INLINE = True``: the check does no DNS (local CPU work only), so the pipeline
    # runs it in the evaluating thread instead of handing it to a thread; such a check cannot
    # be abandoned at the deadline. Optional ``runs_inline(ctx) -> bool``: the same for one
    # message, when it leaves the check nothing to look up (no DKIM signature, no ARC set).

    def run(self, ctx: CheckContext) -> CheckResult: ...
