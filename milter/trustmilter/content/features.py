"""Message features for content scoring, parsed once per message and shared by the Bayes and the
scikit-learn scorers.

What is kept is what carries over from one decade's mail to the next: the decoded text, the
link targets against the link text, hidden text, image-only bodies, attachments by type, and a
few header facts (display name versus address, Reply-To mismatch, mailer, Received hops).

Only a bounded prefix of a message is analysed (``content.max_bytes``), as SpamAssassin and
rspamd do: a 50 MB attachment costs no more than its first part. Nothing here raises on
hostile input; whatever cannot be decoded degrades to replacement characters, and a parser
failure leaves a defect note and the features read so far.
"""
from __future__ import annotations

import codecs
import email
import email.message
import email.policy
import email.utils
import logging
import re
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, TypeVar

from trustmilter.content.html import html_to_text
from trustmilter.message import Header, ParsedMessage, decode_words

log = logging.getLogger("trustmilter.content")

DEFAULT_MAX_BYTES = 262144
DEFAULT_MAX_TEXT_CHARS = 60000
DEFAULT_MAX_PARTS = 64

# Charsets that mail labels wrongly or that Python spells differently. Supersets are used where
# senders routinely mislabel (windows-1252 sent as iso-8859-1, GBK sent as gb2312).
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "us-ascii": "utf-8",
    "ascii": "utf-8", "ansi_x3.4-1968": "utf-8", "gb2312": "gb18030", "gbk": "gb18030",
    "x-gbk": "gb18030", "ks_c_5601-1987": "cp949", "euc-kr": "cp949", "x-sjis": "shift_jis",
    "shift-jis": "shift_jis", "sjis": "shift_jis", "x-euc-jp": "euc_jp", "windows-874": "cp874",
    "tis-620": "cp874", "x-mac-roman": "mac_roman", "unicode-1-1-utf-7": "utf-7", "utf8": "utf-8",
    "x-user-defined": "cp1252", "unknown-8bit": "utf-8", "x-unknown": "utf-8", "unknown": "utf-8",
    "default": "utf-8", "charset": "utf-8", "3dutf-8": "utf-8", "big5": "big5hkscs",
}
# Attachment types that deliver malware or phishing pages in today's mail.
DANGEROUS_EXTENSIONS = frozenset({
    "exe", "scr", "pif", "com", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta",
    "jar", "msi", "lnk", "iso", "img", "vhd", "vhdx", "html", "htm", "shtml", "svg", "xhtml",
    "docm", "xlsm", "pptm", "one", "cab", "ps1", "reg", "chm", "cpl", "dll", "ace", "arj",
})
ARCHIVE_EXTENSIONS = frozenset({"zip", "rar", "7z", "gz", "tgz", "bz2", "xz", "tar", "z", "lzh"})
SHORTENERS = frozenset({
    "bit.ly", "tinyurl.com", "t.co", "goo.gl", "ow.ly", "is.gd", "buff.ly", "rebrand.ly",
    "cutt.ly", "shorturl.at", "rb.gy", "t.ly", "tiny.cc", "s.id", "bl.ink", "lnkd.in", "v.gd",
    "qrco.de", "shorturl.com",
})
FREEMAIL = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "yahoo.co.uk", "yahoo.fr", "ymail.com",
    "hotmail.com", "hotmail.co.uk", "outlook.com", "live.com", "msn.com", "aol.com", "mail.com",
    "gmx.com", "gmx.de", "gmx.net", "web.de", "mail.ru", "yandex.ru", "yandex.com", "qq.com",
    "163.com", "126.com", "protonmail.com", "proton.me", "icloud.com", "me.com", "zoho.com",
    "rediffmail.com", "excite.com", "lycos.com", "juno.com", "netscape.net", "earthlink.net",
})
# Brands phishers imitate most. A link or sender domain that contains one of these names (or
# is one edit away) but is not the brand's own registered domain is a lookalike.
BRANDS = {
    "paypal": {"paypal.com"}, "microsoft": {"microsoft.com", "office.com", "live.com"},
    "office365": {"office.com", "microsoft.com"}, "outlook": {"outlook.com", "live.com"},
    "apple": {"apple.com", "icloud.com"}, "icloud": {"icloud.com", "apple.com"},
    "amazon": {"amazon.com", "amazon.co.uk", "amazon.de", "amazonses.com"},
    "netflix": {"netflix.com"}, "docusign": {"docusign.com", "docusign.net"},
    "dropbox": {"dropbox.com"}, "google": {"google.com", "googlemail.com", "gmail.com"},
    "linkedin": {"linkedin.com"}, "facebook": {"facebook.com", "facebookmail.com"},
    "instagram": {"instagram.com"}, "coinbase": {"coinbase.com"}, "binance": {"binance.com"},
    "metamask": {"metamask.io"}, "wellsfargo": {"wellsfargo.com"}, "chase": {"chase.com"},
    "bankofamerica": {"bankofamerica.com"}, "dhl": {"dhl.com", "dhl.de"},
    "fedex": {"fedex.com"}, "usps": {"usps.com"}, "ups": {"ups.com"},
    "adobe": {"adobe.com"}, "wetransfer": {"wetransfer.com"}, "sharepoint": {"sharepoint.com"},
    "onedrive": {"live.com", "microsoft.com"}, "ebay": {"ebay.com"}, "steam": {"steampowered.com",
    "steamcommunity.com"}, "irs": {"irs.gov"}, "hmrc": {"gov.uk"},
}

# (?:(?:https?|hxxps?|ftp)://|www\.)[^\s<>"'()\[\]{}]+ with re.I, spelled with character
# classes and one class first so that the regex engine skips to the possible first letters
# (with re.I it tries every position); "ſ" (U+017F) is the one character beyond ASCII that re.I
# takes for one of these letters ("s"). tokenize._URLS is the same with fewer stop characters.
_URL_IN_TEXT = re.compile(r"[hHfFwW](?:(?<=[hH])(?:[tT][tT]|[xX][xX])[pP][sS\u017f]?://|(?<=[fF])[tT][pP]://"
                          r"""|(?<=[wW])[wW][wW]\.)[^\s<>"'()\[\]{}]+""")
_DOMAIN_IN_TEXT = re.compile(r"(?:https?://)?((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24})\b", re.I)
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_HEX_HOST = re.compile(r"^(?:0x[0-9a-f]+|\d{8,10})$", re.I)
_RECEIVED_FROM_UNKNOWN = re.compile(r"from\s+\S+\s+\(\s*(?:unknown|\[)", re.I)

# Per-character tests done in C: the ASCII bytes that are not letters / not upper-case letters,
# deleted by bytes.translate so that what is left can be counted.
_NOT_ALPHA = bytes(c for c in range(128) if not chr(c).isalpha())
_NOT_UPPER = bytes(c for c in range(128) if not (chr(c).isalpha() and chr(c).isupper()))
_NON_ASCII = re.compile(r"[^\x00-\x7f]")

_T = TypeVar("_T")


def letter_counts(text: str) -> tuple[int, int, int]:
    """(letters, upper-case letters, non-ASCII characters) in ``text``: the number of characters
    with ``c.isalpha()``, with ``c.isalpha() and c.isupper()``, and with ``ord(c) > 127``.
    The ASCII part is counted in C; other characters once per distinct character."""
    ascii_part = text.encode("ascii", "ignore")     # drops exactly the characters above 127
    letters = len(ascii_part.translate(None, _NOT_ALPHA))
    upper = len(ascii_part.translate(None, _NOT_UPPER))
    non_ascii = len(text) - len(ascii_part)
    if non_ascii:
        for char, count in Counter(_NON_ASCII.findall(text)).items():
            if char.isalpha():
                letters += count
                if char.isupper():
                    upper += count
    return letters, upper, non_ascii


_psl_lock = threading.Lock()
_psl: dict[bool, Any] = {}


def warm_up() -> None:
    """Parse both Public Suffix List variants now (~40 ms each), not in a long-lived process's
    first message with a link (the milter's workers call this before their first message)."""
    for strict in (False, True):
        _public_suffix_list(strict)


def _public_suffix_list(strict: bool) -> Any:
    with _psl_lock:
        if strict not in _psl:
            from publicsuffixlist import PublicSuffixList
            _psl[strict] = PublicSuffixList(accept_unknown=not strict)
        return _psl[strict]


@lru_cache(maxsize=65536)
def registered_domain(host: str, strict: bool = False) -> str:
    """The registrable domain of ``host`` ("" for IPs and bare suffixes). An unknown TLD counts
    as a suffix (the PSL's implicit "*" rule) unless ``strict``: text like "file.txt" in a link's
    text must name a real TLD before it counts as a domain."""
    host = host.strip(".").lower()
    if not host or _IPV4.match(host) or ":" in host:
        return ""
    try:
        return _public_suffix_list(strict).privatesuffix(host) or ""
    except Exception:  # noqa: BLE001 - a hostile host name must not break scoring
        return ""


@dataclass
class Limits:
    """How much of a message content analysis reads (see ``content:`` in defaults.yaml)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_parts: int = DEFAULT_MAX_PARTS

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "Limits":
        section = section or {}
        return cls(max_bytes=int(section.get("max_bytes", DEFAULT_MAX_BYTES)),
                   max_text_chars=int(section.get("max_text_chars", DEFAULT_MAX_TEXT_CHARS)),
                   max_parts=int(section.get("max_parts", DEFAULT_MAX_PARTS)))


@dataclass
class Link:
    url: str
    scheme: str
    host: str
    domain: str          # registered domain; "" for IP hosts and unknown TLDs
    text: str = ""       # anchor text (HTML links)
    text_domain: str = ""  # registered domain the anchor text names, if any
    is_ip: bool = False
    has_userinfo: bool = False
    idn: bool = False    # punycode or non-ASCII host
    port: bool = False
    in_html: bool = False

    @property
    def mismatched(self) -> bool:
        """The text names one domain, the target is another: the classic phishing link."""
        return bool(self.text_domain) and self.text_domain != self.domain and bool(self.host)


@dataclass
class Attachment:
    filename: str
    content_type: str
    size: int
    ext: str
    double_ext: bool = False


@dataclass
class MessageFeatures:
    subject: str = ""
    from_name: str = ""
    from_addr: str = ""
    from_domain: str = ""
    from_rd: str = ""
    reply_to_rds: list[str] = field(default_factory=list)
    return_path_rd: str = ""
    to_count: int = 0
    cc_count: int = 0
    mailer: str = ""
    message_id_rd: str = ""
    has_date: bool = True
    header_names: frozenset[str] = frozenset()
    header_values: dict[str, str] = field(default_factory=dict)   # a few headers, first value
    content_type: str = ""
    part_types: list[str] = field(default_factory=list)
    charsets: list[str] = field(default_factory=list)
    encodings: list[str] = field(default_factory=list)
    text_plain: str = ""
    html_text: str = ""
    html_present: bool = False
    hidden_text: str = ""
    html_title: str = ""
    image_alt: str = ""
    links: list[Link] = field(default_factory=list)
    images: int = 0
    tracking_pixels: int = 0
    forms: int = 0
    password_inputs: int = 0
    scripts: int = 0
    iframes: int = 0
    html_tags: int = 0
    attachments: list[Attachment] = field(default_factory=list)
    received_hops: int = 0
    received_unknown_rdns: bool = False
    size: int = 0
    truncated: bool = False
    defects: list[str] = field(default_factory=list)

    def derived(self, name: str, compute: Callable[[], _T]) -> _T:
        """A value computed from the text fields, computed once: the tokenizer and the model
        both need some (the body text, its regex facts). The cache is dropped whenever one of
        the text fields is no longer the object it was computed from."""
        key = (self.text_plain, self.html_text, self.subject)
        memo = self.__dict__.get("_derived")
        if memo is None or memo[0][0] is not key[0] or memo[0][1] is not key[1] or memo[0][2] is not key[2]:
            memo = (key, {})
            self.__dict__["_derived"] = memo
        values: dict[str, Any] = memo[1]
        if name not in values:
            values[name] = compute()
        return values[name]  # type: ignore[no-any-return]

    @property
    def text(self) -> str:
        """All readable body text: plain parts, then the text of HTML parts."""
        if self.text_plain and self.html_text:
            # multipart/alternative carries the same words twice; the HTML side wins when the
            # plain side is a stub ("view this mail in a browser").
            if len(self.text_plain) >= len(self.html_text) // 3:
                return self.text_plain
            return self.derived("text", lambda: self.text_plain + "\n" + self.html_text)
        return self.text_plain or self.html_text

    @property
    def image_only(self) -> bool:
        if self.images <= 0 and not any(a.content_type.startswith("image/") for a in self.attachments):
            return False
        # Fewer than 8 words: splitting off at most 8 leaves 8 or 9 pieces when there are more.
        return len(self.text.split(None, 8)) < 8

    @property
    def link_domains(self) -> list[str]:
        seen: dict[str, None] = {}
        for link in self.links:
            if link.domain:
                seen.setdefault(link.domain, None)
        return list(seen)


def decode_bytes(payload: bytes, charset: str | None) -> str:
    """Decode with the declared charset, forgiving the usual mislabels; never raises."""
    name = (charset or "").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name) or "utf-8"
    try:
        codecs.lookup(name)
    except (LookupError, ValueError):  # ValueError: a NUL in the charset name
        name = "utf-8"
    if name == "utf-8":
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            # Undeclared 8-bit text is far more often windows-1252 than broken UTF-8.
            return payload.decode("cp1252", "replace")
    try:
        return payload.decode(name, "replace")
    except Exception:  # noqa: BLE001 - some codecs raise other errors on garbage (utf-7, idna)
        return payload.decode("utf-8", "replace")


# Mailboxes of atoms of letters and digits: "local@domain", "<local@domain>", "Name <...>" and
# "\"Name\" <...>", in lists joined by commas. The stdlib address parser (slow) gives each one
# as (the name, with its words joined by single spaces, or "", the address); a unit test holds
# the two equal. Anything else goes to the stdlib parser.
_NAME = r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*"
_ADDR_SPEC = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
_MAILBOX = (rf"(?:(?:({_NAME})|\"({_NAME})\") ?)?<({_ADDR_SPEC})>|({_ADDR_SPEC})")
_SIMPLE_MAILBOX = re.compile(_MAILBOX)
_SIMPLE_MAILBOX_LIST = re.compile(rf"(?:{_MAILBOX})(?: *, *(?:{_MAILBOX}))*")


def _first_addr(value: str) -> tuple[str, str]:
    simple = _SIMPLE_MAILBOX.fullmatch(value)
    if simple is not None:
        name, quoted, angle, bare = simple.groups()
        return name or quoted or "", (angle or bare).lower()
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:  # noqa: BLE001
        return "", ""
    for name, addr in pairs:
        if addr or name:
            return name.strip().strip('"').strip(), addr.strip().lower()
    return "", ""


def _count_addrs(value: str) -> int:
    if _SIMPLE_MAILBOX_LIST.fullmatch(value) is not None:
        return value.count("@")     # one per mailbox: names hold no "@"
    try:
        return sum(1 for _n, a in email.utils.getaddresses([value]) if a)
    except Exception:  # noqa: BLE001
        return 0


def _domain_of(addr: str) -> str:
    return addr.rsplit("@", 1)[1].strip(".>").lower() if "@" in addr else ""


def make_link(raw_url: str, text: str = "", in_html: bool = False,
              base: str = "") -> Link | None:
    """Normalize a link target; None when it is not a web or mail link worth scoring."""
    url = raw_url.strip().strip("\"'<>").replace("\\", "/")
    url = re.sub(r"[\s\x00-\x1f]+", "", url)
    if not url or url.startswith(("#", "mailto:", "tel:", "cid:", "javascript:", "data:")):
        if url.lower().startswith("data:text/html"):
            return Link(url=url[:80], scheme="data", host="", domain="", text=text, in_html=in_html)
        return None
    low = url.lower()
    if low.startswith("hxxp"):
        url = "http" + url[4:]
        low = url.lower()
    if low.startswith("www."):
        url = "http://" + url
    elif low.startswith("//"):
        url = "http:" + url
    elif "://" not in low[:12]:
        if base:
            url = urllib.parse.urljoin(base, url)
        else:
            return None  # a relative link with no base: nothing to learn
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        has_port = parts.port is not None
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ftp"):
        return None
    host = host.strip(".").lower()
    idn = host.startswith("xn--") or ".xn--" in host
    if host and not host.isascii():
        idn = True
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    is_ip = bool(_IPV4.match(host) or _HEX_HOST.match(host) or ":" in host)
    link = Link(url=url[:500], scheme=scheme, host=host, domain="" if is_ip else registered_domain(host),
                text=text, is_ip=is_ip, has_userinfo="@" in (parts.netloc or ""), idn=idn,
                port=has_port, in_html=in_html)
    if text:
        named = _DOMAIN_IN_TEXT.search(text)
        if named:
            link.text_domain = registered_domain(named.group(1), strict=True)
    return link


_HOMOGLYPHS = str.maketrans({"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b"})


@lru_cache(maxsize=16384)
def lookalike_brand(domain: str) -> str:
    """The brand a registered domain imitates ("" if none): it contains a brand's name, or is
    one edit away from it, without being one of that brand's own domains."""
    if not domain:
        return ""
    label = domain.split(".", 1)[0]
    # Homoglyphs phishers use in ASCII (micros0ft, paypa1, rnicrosoft).
    folded = label.translate(_HOMOGLYPHS).replace("rn", "m").replace("vv", "w")
    pieces = set(re.split(r"[-_\d]+", label)) | set(re.split(r"[-_]+", folded))
    for brand, owned in BRANDS.items():
        if domain in owned:
            return ""
        # Whole hyphen-separated pieces only: "secure-paypal-login" imitates PayPal, while
        # "purchase" does not imitate Chase.
        if brand in pieces or (len(brand) >= 6 and label.startswith(brand)):
            return brand
        if len(brand) >= 5 and abs(len(label) - len(brand)) <= 1 and _one_edit(label, brand):
            return brand
    return ""


@lru_cache(maxsize=16384)
def brand_in_subdomain(host: str, domain: str) -> str:
    """A brand's own domain written into the subdomain of another (paypal.com.secure-x.top)."""
    if not host or not domain or host == domain:
        return ""
    pieces = set(re.split(r"[-_.\d]+", host[: -len(domain)]))
    for brand, owned in BRANDS.items():
        if brand in pieces and domain not in owned:
            return brand
    return ""


def _one_edit(a: str, b: str) -> bool:
    if a == b:
        return False
    if len(a) == len(b):
        diffs = [(x, y) for x, y in zip(a, b) if x != y]
        if len(diffs) == 1:
            return True
        # a swap of two neighbours (paypla)
        return len(diffs) == 2 and sorted(a) == sorted(b)
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    for i in range(len(long_)):
        if long_[:i] + long_[i + 1:] == short:
            return True
    return False


def _received_facts(values: list[str], out: MessageFeatures) -> None:
    """From the first four Received values (the hops nearest to us)."""
    # The substring test first: it rules out nearly every value before the regex runs.
    out.received_unknown_rdns = any("unknown" in v.lower() and _RECEIVED_FROM_UNKNOWN.search(v)
                                    for v in values[:4])


_KEPT_HEADERS = ("x-mailer", "user-agent", "x-priority", "x-msmail-priority", "importance",
                 "precedence", "list-id", "list-unsubscribe", "list-unsubscribe-post",
                 "auto-submitted", "x-spam-status", "content-type", "mime-version", "organization")


def extract(message: ParsedMessage | bytes, limits: Limits | None = None) -> MessageFeatures:
    """Features of one message; never raises."""
    limits = limits or Limits()
    if isinstance(message, (bytes, bytearray)):
        message = ParsedMessage.parse(bytes(message))
    out = MessageFeatures(size=len(message.raw))
    try:
        _headers(message, out)
    except Exception as exc:  # noqa: BLE001 - degrade, never fail a message
        out.defects.append(f"headers: {type(exc).__name__}")
    try:
        _body(message, out, limits)
    except Exception as exc:  # noqa: BLE001
        log.debug("content features: body parse failed", exc_info=True)
        out.defects.append(f"body: {type(exc).__name__}")
    return out


def clean_text(value: str) -> str:
    """Undo surrogateescape: raw 8-bit header bytes are UTF-8 when they decode as such, else
    (mostly) windows-1252."""
    if value.isascii():
        return value
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return decode_bytes(data, "utf-8")


class _HeaderIndex:
    """Headers by lower-cased name, built in one pass (ParsedMessage.get scans all). A value is
    only unfolded and decoded when asked for: most headers are not."""

    def __init__(self, message: ParsedMessage) -> None:
        self.headers: dict[str, list[Header]] = {}
        for h in message.headers:
            self.headers.setdefault(h.name.lower(), []).append(h)

    def get(self, name: str) -> str | None:
        found = self.headers.get(name.lower())
        return found[0].value if found else None

    def get_all(self, name: str, limit: int | None = None) -> list[str]:
        return [h.value for h in self.headers.get(name.lower(), ())[:limit]]


def _header(message: "_HeaderIndex", name: str) -> str | None:
    value = message.get(name)
    return None if value is None else clean_text(value)


def _headers(parsed: ParsedMessage, out: MessageFeatures) -> None:
    message = _HeaderIndex(parsed)
    out.header_names = frozenset(message.headers)
    for name in _KEPT_HEADERS:
        value = _header(message, name)
        if value is not None:
            out.header_values[name] = value[:300]
    out.subject = clean_text(decode_words(_header(message, "Subject") or ""))[:500]
    from_value = _header(message, "From") or ""
    name, addr = _first_addr(clean_text(decode_words(from_value)))
    out.from_name, out.from_addr = name[:200], addr[:200]
    out.from_domain = _domain_of(addr)
    out.from_rd = registered_domain(out.from_domain) if out.from_domain else ""
    for value in message.get_all("Reply-To", 3):
        _n, reply = _first_addr(clean_text(decode_words(value)))
        rd = registered_domain(_domain_of(reply))
        if rd:
            out.reply_to_rds.append(rd)
    return_path = message.get("Return-Path")
    if return_path:
        out.return_path_rd = registered_domain(_domain_of(return_path.strip().strip("<>")))
    out.to_count = sum(_count_addrs(v) for v in message.get_all("To", 5))
    out.cc_count = sum(_count_addrs(v) for v in message.get_all("Cc", 5))
    out.mailer = (_header(message, "X-Mailer") or _header(message, "User-Agent") or "")[:200]
    msgid = message.get("Message-ID") or ""
    if "@" in msgid:
        out.message_id_rd = registered_domain(msgid.rsplit("@", 1)[1].strip(" >"))
    out.has_date = "date" in message.headers
    out.received_hops = len(message.headers.get("received", ()))
    _received_facts(message.get_all("Received", 4), out)


def _body(message: ParsedMessage, out: MessageFeatures, limits: Limits) -> None:
    raw = message.raw
    if len(raw) > limits.max_bytes:
        out.truncated = True
        raw = raw[:limits.max_bytes]
    msg = _mime_tree(message, raw)
    out.content_type = msg.get_content_type()
    plain: list[str] = []
    htmls: list[str] = []
    budget = limits.max_text_chars
    for index, part in enumerate(msg.walk()):
        if index >= limits.max_parts:
            out.defects.append("too many MIME parts")
            break
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype.startswith("multipart/"):
            # multipart without a usable boundary: mail readers show the body as text.
            out.defects.append("multipart part without boundary")
            ctype = "text/plain"
        out.part_types.append(ctype)
        charset = part.get_content_charset() or ""
        if charset and charset not in out.charsets:
            out.charsets.append(charset[:40])
        cte = str(part.get("Content-Transfer-Encoding", "") or "").strip().lower()[:30]
        if cte and cte not in out.encodings:
            out.encodings.append(cte)
        disposition = str(part.get("Content-Disposition", "") or "").lower()
        filename = _filename(part)
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = b""
        is_attachment = "attachment" in disposition or (bool(filename) and ctype not in ("text/plain", "text/html"))
        if ctype in ("text/plain", "text/html") and not is_attachment:
            if budget > 0:
                text = decode_bytes(payload[:budget * 4], charset)[:budget]
                budget -= len(text)
                (htmls if ctype == "text/html" else plain).append(text)
            continue
        ext = filename.rsplit(".", 1)[-1].lower()[:10] if "." in filename else ""
        stem = filename.rsplit(".", 1)[0].lower() if "." in filename else filename.lower()
        double = "." in stem and stem.rsplit(".", 1)[-1][:4] in ("pdf", "doc", "docx", "xls", "xlsx", "jpg", "png", "txt")
        out.attachments.append(Attachment(filename=filename[:200], content_type=ctype, size=len(payload),
                                          ext=ext, double_ext=double))
    out.text_plain = "\n".join(plain)
    for link_text in _URL_IN_TEXT.findall(out.text_plain)[:100]:
        link = make_link(link_text)
        if link is not None:
            out.links.append(link)
    if htmls:
        out.html_present = True
        result = html_to_text("\n".join(htmls))
        out.html_text = result.text[:limits.max_text_chars]
        out.hidden_text = result.hidden_text[:5000]
        out.html_title = result.title
        out.image_alt = result.image_alt
        out.images, out.tracking_pixels = result.images, result.tracking_pixels
        out.forms, out.password_inputs = result.forms, result.password_inputs
        out.scripts, out.iframes, out.html_tags = result.scripts, result.iframes, result.tags
        for hl in result.links:
            link = make_link(hl.href, hl.text, in_html=True, base=result.base_href)
            if link is not None:
                out.links.append(link)
        if result.meta_refresh and "url=" in result.meta_refresh.lower():
            target = result.meta_refresh.split("=", 1)[-1]
            link = make_link(target.split("=", 1)[-1], in_html=True)
            if link is not None:
                out.links.append(link)
        # URLs written as text inside the HTML (not as links) count too.
        if not result.links:
            for link_text in _URL_IN_TEXT.findall(out.html_text)[:50]:
                link = make_link(link_text)
                if link is not None:
                    out.links.append(link)


def _mime_tree(message: ParsedMessage, raw: bytes) -> email.message.Message:
    """``email.message_from_bytes(raw, policy=compat32)`` as _body reads it (its Content-*
    fields and payloads), without running the stdlib parser over the headers again when
    ``message`` already split them the way it would, and there is no MIME tree to build (one
    part: the body is the payload as it stands).

    ``raw`` is ``message.raw`` or a prefix of it. The stdlib's header block ends at the first
    line that is not a field, a continuation or a leading "From " line; ParsedMessage's at the
    first empty line. They agree when ParsedMessage found no defect (every line a field or a
    continuation), no lone CR splits a line differently, no "From " line follows the first
    line, and no field has blanks before its colon (ParsedMessage allows them, the stdlib
    ends the headers there). The stdlib's value is then ParsedMessage's raw value with the
    blanks after the colon removed; a unit test holds the two parsers equal."""
    head_end = message.body_offset
    if message.defects or head_end > len(raw) or raw[:1] in (b"\r", b"\n"):
        # a header block cut by the size limit; an empty first line (no headers: the stdlib's
        # body starts after it, ParsedMessage's after the next one)
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    head = raw[:head_end]
    if (head.count(b"\r") != head.count(b"\r\n") or b"\nFrom " in head or b" :" in head
            or b"\t:" in head):
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    msg = email.message.Message(policy=email.policy.compat32)
    for h in message.headers:
        # Only the Content-* fields: all that _body reads (type, charset, name, disposition,
        # transfer encoding), and each Message.get scans every field it holds.
        if h.name[:8].lower() == "content-":
            msg.set_raw(h.name, h.raw_value.decode("ascii", "surrogateescape").lstrip(" \t"))
    if msg.get_content_maintype() in ("multipart", "message"):
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    msg.set_payload(raw[head_end:].decode("ascii", "surrogateescape"))
    return msg


def _filename(part: email.message.Message) -> str:
    try:
        name = part.get_filename() or part.get_param("name") or ""
    except Exception:  # noqa: BLE001 - broken RFC 2231 parameters
        return ""
    if isinstance(name, tuple):  # RFC 2231 (charset, language, value)
        name = name[2] if len(name) > 2 else ""
    name = str(name)
    return clean_text(decode_words(name)).strip().strip('"')
