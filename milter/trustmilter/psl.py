"""Organizational domains (RFC 7489 3.2) from the Public Suffix List.

Both sections of the list count: the ICANN section and the private one (``za.org``, ``github.io``,
``blogspot.com``...), because a private suffix is as much a boundary between unrelated owners as
``co.uk`` is, and DMARC alignment across it would let one customer vouch for another.

The list is parsed once per engine (``for_engine``); ``dmarc.psl_file`` names another list file
(e.g. a daily download) instead of the one shipped inside the ``publicsuffixlist`` package.
Names may be given in Unicode or as A-labels; the answer comes back in the same form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import publicsuffixlist

from trustmilter.errors import ConfigError

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine

BUILTIN_LIST = publicsuffixlist.PSLFILE
_PRIVATE_MARKER = "===BEGIN PRIVATE DOMAINS==="


@dataclass(frozen=True)
class OrgDomains:
    """A loaded Public Suffix List answering registrable/organizational-domain questions."""

    _psl: publicsuffixlist.PublicSuffixList
    source: str
    rules: int                 # rules read from the file (both sections)
    has_private_section: bool

    @classmethod
    def load(cls, path: str | None = None) -> "OrgDomains":
        """Read a list file (None or "" = the package's copy). An unreadable or empty file is a
        ConfigError: with no rules every name would look like a one-label suffix plus one label,
        which silently breaks alignment."""
        source = path or BUILTIN_LIST
        try:
            with open(source, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read the Public Suffix List: {exc.strerror}", file=source,
                              key="dmarc.psl_file") from None
        text = data.decode("utf-8", "replace")
        lines = text.splitlines()
        rules = sum(1 for line in lines if line.strip() and not line.lstrip().startswith("//"))
        if rules == 0:
            raise ConfigError("the Public Suffix List file holds no rules", file=source,
                              key="dmarc.psl_file")
        # accept_unknown: a TLD missing from the list is still a public suffix (the PSL's
        # implicit "*" rule); only_icann=False keeps the private section.
        psl = publicsuffixlist.PublicSuffixList(lines, accept_unknown=True,
                                                accept_encoded_idn=True, only_icann=False)
        return cls(psl, source, rules, any(_PRIVATE_MARKER in line for line in lines))

    def public_suffix(self, domain: str | None) -> str | None:
        """The longest public suffix of ``domain`` (None for an empty or malformed name)."""
        name = _prepare(domain)
        return None if name is None else self._psl.publicsuffix(name)

    def registrable_domain(self, domain: str | None) -> str | None:
        """Public suffix plus one label; None when ``domain`` is itself a public suffix, is empty,
        or has an empty label (a leading dot). Lower-cased."""
        name = _prepare(domain)
        return None if name is None else self._psl.privatesuffix(name)

    def organizational_domain(self, domain: str) -> str:
        """RFC 7489 3.2. For a name that is itself a public suffix there is no further label to
        add, so the organizational domain is the name itself (as OpenDMARC and rspamd do): its own
        _dmarc record is then the only one consulted."""
        name = domain.strip().rstrip(".").lower()
        return self.registrable_domain(name) or name


def _prepare(domain: str | None) -> str | None:
    if domain is None:
        return None
    name = domain.strip()
    # A trailing dot is the DNS root (same name); a leading dot or an empty label is malformed.
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith(".") or ".." in name:
        return None
    return name


def for_engine(engine: "Engine") -> OrgDomains:
    """The engine's list, loaded on first use and then shared by every message and thread."""
    path = str(engine.config.get("dmarc.psl_file") or "")
    return engine.cached(f"psl:{path or BUILTIN_LIST}", lambda: OrgDomains.load(path or None))
