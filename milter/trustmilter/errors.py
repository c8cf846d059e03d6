"""One exception root, as dkimpy has: callers catch ``TrustmilterError``."""
from __future__ import annotations


class TrustmilterError(Exception):
    """Root of every error trustmilter raises on purpose."""


class ConfigError(TrustmilterError):
    """A configuration or rule file is wrong. Names the file, line and key."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file, self.line, self.key, self.detail = file, line, key, message
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        keypart = f"key '{key}': " if key else ""
        super().__init__(f"{prefix}{keypart}{message}")


class DNSTempError(TrustmilterError):
    """A lookup could not be completed (timeout, SERVFAIL, deadline): a temperror, never a fail."""


class DNSPermError(TrustmilterError):
    """A lookup answered with something unusable (e.g. a malformed name)."""


class MessageSourceError(TrustmilterError):
    """A path given to ``scan``/``train`` could not be read as mail."""
