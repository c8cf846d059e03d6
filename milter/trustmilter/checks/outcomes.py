"""Typed outcomes of the authentication checks, read by later checks (DMARC reads SPF, DKIM and
ARC; reputation reads the authenticated identities). Kept apart so no check imports another."""
from __future__ import annotations

from dataclasses import dataclass

from trustmilter.types import AuthStatus


@dataclass(frozen=True)
class SPFOutcome:
    """RFC 7208 results for the two identities. ``mailfrom`` is the MAIL FROM result (for the
    null sender: the HELO result, as RFC 7208 2.4 says); ``domain`` is the domain it was for."""

    mailfrom: AuthStatus
    domain: str | None                 # MAIL FROM domain, or the HELO name for the null sender
    helo: AuthStatus | None = None     # None when the HELO identity was not checked
    helo_domain: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class DKIMSignatureResult:
    status: AuthStatus                 # pass | fail | neutral | temperror | permerror | policy
    domain: str                        # d=
    selector: str                      # s=
    b: str                             # leading chars of b= (RFC 8601 header.b, >= 8 chars)
    algorithm: str                     # a=
    reason: str = ""


@dataclass(frozen=True)
class DKIMOutcome:
    signatures: tuple[DKIMSignatureResult, ...]

    def passing_domains(self) -> list[str]:
        return [s.domain for s in self.signatures if s.status is AuthStatus.PASS]


@dataclass(frozen=True)
class ARCOutcome:
    status: AuthStatus                 # pass | fail | none | temperror
    sealer: str | None = None          # d= of the newest ARC-Seal
    instance: int = 0                  # i= of the newest set
    trusted: bool = False              # sealer is in arc.trusted_sealers and the chain passed
    reason: str = ""


@dataclass(frozen=True)
class DMARCOutcome:
    status: AuthStatus                 # pass | fail | none | temperror | permerror
    from_domain: str | None
    policy_domain: str | None          # where the record was found (From or org domain)
    policy: str | None                 # p= or sp= that applied: none | quarantine | reject
    applied_policy: str | None         # after pct: what we act on
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
