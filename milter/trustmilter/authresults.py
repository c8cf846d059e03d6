"""Authentication-Results (RFC 8601): build ours with authres, and spot incoming ones that
claim our authserv-id (forgeries to remove, section 5)."""
from __future__ import annotations

from typing import Any

import authres
import authres.arc  # noqa: F401  (registers the arc method with authres)
import authres.dmarc  # noqa: F401  (registers the dmarc method)

_FEATURES = authres.all_features()


def build(authserv_id: str, results: list[Any]) -> str:
    """The header value (no field name): "id; spf=pass ...; dkim=..." or "id; none"."""
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    text = str(header)
    prefix = "Authentication-Results: "
    return text[len(prefix):] if text.startswith(prefix) else text


def parse(value: str) -> authres.AuthenticationResultsHeader:
    """Parse a header value (unfolded). Raises authres.AuthResError on bad syntax."""
    unfolded = " ".join(value.split())
    return _FEATURES.parse_value(unfolded)


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    """True when an incoming header names our authserv-id (case-insensitive, RFC 8601 2.5).

    An unparseable header is judged by its first token, so a broken forgery is still caught."""
    try:
        found = parse(value).authserv_id
    except Exception:  # noqa: BLE001 - authres raises several types on hostile input
        # "; ..." or "(comment)": no first token at all (an IndexError here tempfailed the mail).
        found = (value.strip().split(";", 1)[0].split() or [""])[0]
    return str(found).strip().lower() == authserv_id.strip().lower()


def forged_indexes(header_values: list[str], authserv_id: str) -> list[int]:
    """1-based indexes (among Authentication-Results headers) to delete, highest first, because
    the MTA renumbers after each delete (the OpenDKIM issue 185 trap)."""
    hits = [i for i, v in enumerate(header_values, start=1) if claims_authserv_id(v, authserv_id)]
    return sorted(hits, reverse=True)
