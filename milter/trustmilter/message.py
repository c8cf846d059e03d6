"""Parse a message once. Headers are kept as the exact bytes that arrived (DKIM and ARC need
them); decoded views are computed on demand and cached. Nothing here raises on hostile input:
a header that cannot be decoded degrades to a best-effort string.
"""
from __future__ import annotations

import email.header
import email.utils
import re
from dataclasses import dataclass, field
from functools import cached_property

# The header block ends at the first empty line (CRLF CRLF or a bare LF LF).
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)$", re.DOTALL)


@dataclass
class Header:
    name: str           # as written (case kept)
    raw_value: bytes    # everything after the colon, folding included, no final line break

    @property
    def lname(self) -> str:
        return self.name.lower()

    @cached_property
    def value(self) -> str:
        """Unfolded, surrounding whitespace stripped, decoded as UTF-8 (surrogateescape)."""
        text = self.raw_value.decode("utf-8", "surrogateescape")
        return re.sub(r"\r?\n(?=[ \t])", "", text).strip()


@dataclass
class ParsedMessage:
    raw: bytes
    headers: list[Header] = field(default_factory=list)
    body_offset: int = 0
    defects: list[str] = field(default_factory=list)
    # Where the header block ends: the start of the first empty line (len(raw) when none).
    head_end: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> "ParsedMessage":
        match = _HEADER_END.search(raw)
        head_end, offset = (match.start(), match.end()) if match else (len(raw), len(raw))
        msg = cls(raw=raw, body_offset=offset, head_end=head_end)
        msg.headers = _split_headers(raw[:head_end], msg.defects)
        return msg

    @property
    def body(self) -> bytes:
        return self.raw[self.body_offset:]

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [h.value for h in self.headers if h.lname == lname]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    @cached_property
    def from_addresses(self) -> list[str]:
        """Every addr-spec in every From header (RFC 5322 allows a list; DMARC must see them)."""
        out: list[str] = []
        for value in self.get_all("From"):
            # Parse before decoding RFC 2047 words: a decoded display name could add commas.
            for _name, addr in email.utils.getaddresses([value]):
                addr = addr.strip()
                if addr:
                    out.append(addr)
        return out

    @cached_property
    def from_domains(self) -> list[str]:
        domains = []
        for addr in self.from_addresses:
            if "@" in addr:
                domain = addr.rsplit("@", 1)[1].strip().strip(".").lower()
                if domain:
                    domains.append(domain)
        return domains

    @cached_property
    def subject(self) -> str:
        return decode_words(self.get("Subject") or "")


def _split_headers(head: bytes, defects: list[str]) -> list[Header]:
    headers: list[Header] = []
    current: list[bytes] = []

    def flush() -> None:
        if not current:
            return
        line = b"".join(current)
        match = _FIELD.match(line)
        if match:
            name = match.group(1).decode("ascii")
            value = match.group(2)
            headers.append(Header(name, value.rstrip(b"\r\n")))
        else:
            defects.append(f"malformed header line: {line[:60]!r}")
        current.clear()

    # Split keeping line terminators so folded values keep their exact bytes.
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        flush()
        if line.startswith(b"From ") and not headers:
            continue  # mbox separator line
        current.append(line)
    flush()
    return headers


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; undecodable parts degrade to replacement characters."""
    if "=?" not in value:
        return value
    try:
        parts = email.header.decode_header(value)
    except Exception:  # noqa: BLE001 - hostile headers break the stdlib in many ways
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "ascii", "replace"))
        except (LookupError, ValueError):  # ValueError: a NUL in the charset name
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)
