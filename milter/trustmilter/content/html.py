"""HTML to text for content scoring, with what a filter needs kept: link targets and their text,
hidden text, images, forms and scripts.

A regular-expression scanner rather than ``html.parser``: mail HTML is often broken, and the
scanner is several times faster (content scoring has a budget of a few milliseconds per message).
It never raises: whatever does not look like a tag is text.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

# One token of HTML: a comment, a tag (open or close, with its attribute text), or a
# declaration / processing instruction. Text is what lies between matches.
# Plain characters are taken in runs and the quantifiers are possessive: a tag's attribute text
# can be read one way only (plain characters and quoted strings up to the first '>' outside
# quotes), so giving characters back can never turn a failed tag into a match, and the engine
# no longer backtracks through it one character at a time. The same tokens; faster on every
# tag, and 3 to 15 times faster on '<' that never close (still quadratic in their number).
# The repetition of the group itself stays greedy, not possessive: Python 3.11.2 (Debian 12's)
# mismatches a possessive group ('<a">' read as a tag); its alternatives begin with distinct
# characters, so giving back whole iterations finds nothing new either.
_TOKEN = re.compile(
    r"<!--.*?(?:-->|$)|<(/?)([a-zA-Z][a-zA-Z0-9:-]*+)((?:[^>\"']++|\"[^\"]*+\"|'[^']*+')*)>|<![^>]*+>"
    r"|<\?[^>]*+>",
    re.S)
_ATTR = re.compile(r"""([a-zA-Z_:][-a-zA-Z0-9_:.]*)\s*(?:=\s*("[^"]*"|'[^']*'|[^\s>"']+))?""")
_RAW_TEXT_END = {"script": re.compile(r"</script\s*>", re.I), "style": re.compile(r"</style\s*>", re.I),
                 "title": re.compile(r"</title\s*>", re.I)}
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
_BLOCK = frozenset({"p", "div", "br", "tr", "td", "th", "li", "ul", "ol", "table", "h1", "h2", "h3",
                    "h4", "h5", "h6", "blockquote", "pre", "hr", "center", "section", "article",
                    "header", "footer", "dd", "dt", "title", "body", "html", "form", "button"})
# Inline styles that hide text from the reader but not from a filter.
_HIDDEN_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*[01](?:\.\d+)?\s*(?:px|pt|em|%)?\s*(?:;|$)"
    r"|opacity\s*:\s*0(?:\.0+)?\s*(?:;|$)|max-height\s*:\s*0|(?<![-\w])height\s*:\s*0(?:px)?\s*(?:;|$)",
    re.I)
# Runs of blanks, which become one space: only the runs that are not one space already (a
# space followed by more, or any other blank first), since replacing a lone space by itself
# was most of the work.
_WS = re.compile(r" [ \t\r\f\v\u00a0\u200b\u200c\u200d\u2060\ufeff]+"
                 r"|[\t\r\f\v\u00a0\u200b\u200c\u200d\u2060\ufeff][ \t\r\f\v\u00a0\u200b\u200c\u200d\u2060\ufeff]*")
_NL = re.compile(r"\s*\n\s*")
# Tags whose attributes html_to_text reads whatever they say (font: _is_hidden reads its size).
_ATTRS_READ = frozenset({"a", "img", "area", "form", "input", "meta", "base", "font"})
_MAY_HIDE = re.compile(r"style|hidden", re.I)
MAX_STACK = 256
MAX_LINKS = 200


@dataclass
class HtmlLink:
    href: str
    text: str


@dataclass
class HtmlResult:
    text: str = ""                 # what a reader sees
    hidden_text: str = ""          # text styled invisible (display:none, font-size:0, ...)
    links: list[HtmlLink] = field(default_factory=list)
    images: int = 0                # <img> with a source, tracking pixels excluded
    tracking_pixels: int = 0       # 1x1 / 0x0 images
    image_alt: str = ""
    forms: int = 0
    inputs: int = 0                # form fields (password fields in mail are a phishing tell)
    password_inputs: int = 0
    scripts: int = 0
    iframes: int = 0
    tags: int = 0
    meta_refresh: str = ""
    base_href: str = ""
    title: str = ""


def _attrs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in _ATTR.findall(text):
        name = name.lower()
        if name in out:
            continue
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        out[name] = html.unescape(value)
    return out


def _is_hidden(tag: str, attrs: dict[str, str]) -> bool:
    style = attrs.get("style")
    if style and _HIDDEN_STYLE.search(style):
        return True
    if "hidden" in attrs and tag != "input":
        return True
    if tag == "font":
        size = attrs.get("size", "").strip()
        if size in ("0", "1", "-1", "-2", "-3", "-4"):
            # <font size=1> alone is only small print; hidden when also colored white, the
            # classic "invisible salad" of spam.
            color = attrs.get("color", "").strip().lower()
            return size in ("0", "-3", "-4") or color in ("#ffffff", "#fff", "white")
    return False


def _pixel(attrs: dict[str, str]) -> bool:
    w = attrs.get("width", "").strip().rstrip("px")
    h = attrs.get("height", "").strip().rstrip("px")
    return w in ("0", "1") and h in ("0", "1")


def html_to_text(source: str) -> HtmlResult:
    """Convert HTML to visible text, collecting links and the other facts scorers use."""
    out = HtmlResult()
    visible: list[str] = []
    hidden: list[str] = []
    alts: list[str] = []
    stack: list[tuple[str, bool]] = []     # (tag, hides its content)
    open_tags: list[str] = []              # the tags of stack, to find one in C
    hidden_depth = 0
    anchor: tuple[str, list[str]] | None = None
    pos = 0
    length = len(source)
    while pos < length:
        match = _TOKEN.search(source, pos)
        end = match.start() if match else length
        if end > pos:
            chunk = source[pos:end]
            if "&" in chunk:
                chunk = html.unescape(chunk)
            (hidden if hidden_depth else visible).append(chunk)
            if anchor is not None:
                anchor[1].append(chunk)
        if match is None:
            break
        pos = match.end()
        tag = match.group(2)
        if tag is None:
            continue  # comment or declaration
        tag = tag.lower()
        out.tags += 1
        closing = match.group(1) == "/"
        if closing:
            if tag == "a" and anchor is not None:
                if len(out.links) < MAX_LINKS:
                    out.links.append(HtmlLink(anchor[0], _WS.sub(" ", "".join(anchor[1])).strip()[:300]))
                anchor = None
            # Pop to the matching open tag (the innermost); a stray close tag is ignored.
            if tag in open_tags:
                i = len(open_tags) - 1 - open_tags[::-1].index(tag)
                for _t, hid in stack[i:]:
                    if hid:
                        hidden_depth -= 1
                del stack[i:]
                del open_tags[i:]
            if tag in _BLOCK:
                visible.append("\n")
            continue
        raw_attrs = match.group(3) or ""
        # Attributes are parsed where they are read: the tags below, and any other element
        # whose style or "hidden" could hide it (what _is_hidden reads besides font's).
        if tag in _ATTRS_READ or (_MAY_HIDE.search(raw_attrs) is not None and tag not in _VOID):
            attrs = _attrs(raw_attrs) if raw_attrs.strip() else {}
        else:
            attrs = {}
        if tag in _RAW_TEXT_END:
            finder = _RAW_TEXT_END[tag].search(source, pos)
            inner_end = finder.start() if finder else length
            if tag == "script":
                out.scripts += 1
            elif tag == "title":
                out.title = _WS.sub(" ", html.unescape(source[pos:inner_end])).strip()[:300]
            pos = finder.end() if finder else length
            continue
        if tag == "a":
            href = attrs.get("href", "").strip()
            if anchor is not None and len(out.links) < MAX_LINKS:   # unclosed <a>
                out.links.append(HtmlLink(anchor[0], _WS.sub(" ", "".join(anchor[1])).strip()[:300]))
            anchor = (href, []) if href else None
        elif tag == "img":
            if _pixel(attrs):
                out.tracking_pixels += 1
            elif attrs.get("src"):
                out.images += 1
            alt = attrs.get("alt", "").strip()
            if alt:
                alts.append(alt)
                if anchor is not None:
                    anchor[1].append(" " + alt + " ")
        elif tag == "area" and attrs.get("href") and len(out.links) < MAX_LINKS:
            out.links.append(HtmlLink(attrs["href"].strip(), attrs.get("alt", "")))
        elif tag == "form":
            out.forms += 1
            action = attrs.get("action", "").strip()
            if action and len(out.links) < MAX_LINKS:
                out.links.append(HtmlLink(action, ""))
        elif tag == "input":
            out.inputs += 1
            if attrs.get("type", "").lower() == "password":
                out.password_inputs += 1
        elif tag in ("iframe", "frame", "object", "embed"):
            out.iframes += 1
        elif tag == "meta":
            if attrs.get("http-equiv", "").lower() == "refresh":
                out.meta_refresh = attrs.get("content", "")[:300]
        elif tag == "base":
            out.base_href = attrs.get("href", "").strip()
        if tag in _BLOCK:
            visible.append("\n")
        if tag not in _VOID and not raw_attrs.rstrip().endswith("/") and len(stack) < MAX_STACK:
            hides = _is_hidden(tag, attrs)
            stack.append((tag, hides))
            open_tags.append(tag)
            if hides:
                hidden_depth += 1
    if anchor is not None and len(out.links) < MAX_LINKS:
        out.links.append(HtmlLink(anchor[0], _WS.sub(" ", "".join(anchor[1])).strip()[:300]))
    text = _WS.sub(" ", "".join(visible))
    out.text = _NL.sub("\n", text).strip()
    out.hidden_text = _WS.sub(" ", " ".join(hidden)).strip()
    out.image_alt = " ".join(alts)[:1000]
    return out
