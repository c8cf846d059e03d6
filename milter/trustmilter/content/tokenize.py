"""The mail tokenizer shared by Bayes and the model: words of the body and subject, header facts,
link targets (registered domain, host, the mismatch between link text and target), HTML facts
and attachment types, after SpamBayes' tokenizer.

Tokens carry a prefix saying where they came from ("subject:free", "url:rd:example.com"), so
the same word means different things in different places. Body words are lower-cased, stripped
of surrounding punctuation and kept at 3 to 12 characters; longer ones become a "skip:" token
of their first letter and length class, as SpamBayes does (long runs are mostly encoded junk).
Scripts written without spaces (CJK) are cut into character pairs.
"""
from __future__ import annotations

import re
from itertools import chain, repeat
from typing import Iterable

from trustmilter.content.features import (ARCHIVE_EXTENSIONS, DANGEROUS_EXTENSIONS, FREEMAIL,
                                          SHORTENERS, MessageFeatures, brand_in_subdomain,
                                          letter_counts, lookalike_brand)

MIN_WORD = 3
MAX_WORD = 12
MAX_BODY_WORDS = 4000        # bounds the cost of one message
MAX_BIGRAM_WORDS = 600       # word pairs from the start of the body only
_STRIP = "\"'`.,;:!?()[]{}<>*_=+|~^-/\\"
# "http(s)://", "hxxp(s)://", "ftp://" or "www." in any case. Written with character classes
# rather than re.I, and one class first, so that the regex engine skips to the possible first
# letters instead of trying a match at every position. It matches what
# (?:(?:https?|hxxps?|ftp)://|www\.)[^\s<>"']+ matches with re.I: "ſ" (U+017F) is the one
# character beyond ASCII that re.I takes for one of these letters (for "s").
_URLS = re.compile(r"[hHfFwW](?:(?<=[hH])(?:[tT][tT]|[xX][xX])[pP][sS\u017f]?://|(?<=[fF])[tT][pP]://"
                   r"|(?<=[wW])[wW][wW]\.)[^\s<>\"']+")
_EMAILS = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
_NUMBERISH = re.compile(r"^[\d.,:/-]+$")
_MONEY = re.compile(r"[$€£]\s?\d|\d\s?(?:usd|eur|btc|eth|usdt)\b", re.I)
_URGENT = re.compile(r"\b(?:urgent|immediately|suspend(?:ed)?|verify|confirm|expire[sd]?|"
                     r"locked|unusual (?:activity|sign-?in)|within 24 hours|action required)\b", re.I)
# How every _URGENT match begins, in lower case; and the characters re.I matches to a letter
# although their lower() is another string (İ lowers to two characters, ı and ſ to themselves).
_URGENT_STARTS = ("urgent", "immediately", "suspend", "verify", "confirm", "expire", "locked",
                  "unusual ", "within 24 hours", "action required")
_CASE_ODD = ("\u0130", "\u0131", "\u017f")
_MONEY_SYMBOL = re.compile(r"[$€£]\s?\d", re.I)                      # _MONEY's two branches, each
_MONEY_CODE = re.compile(r"\d\s?(?:usd|eur|btc|eth|usdt)\b", re.I)  # starting with a class


def _bucket(n: int) -> str:
    """Coarse size classes: counts matter by order of magnitude, not exactly."""
    if n <= 2:
        return str(n)
    if n <= 5:
        return "3-5"
    if n <= 10:
        return "6-10"
    if n <= 30:
        return "11-30"
    return "31+"


def _len_bucket(n: int) -> str:
    for limit in (0, 100, 300, 1000, 3000, 10000):
        if n <= limit:
            return str(limit)
    return "big"


def words(text: str, limit: int = MAX_BODY_WORDS) -> list[str]:
    """Body words as SpamBayes cuts them (lower case, punctuation stripped, 3..12 chars);
    longer words become "skip:" tokens, CJK runs character pairs."""
    out: list[str] = []
    append = out.append
    low = text.lower()
    all_ascii = low.isascii()       # then no word needs the CJK test
    for word in map(str.strip, low.split()[:limit], repeat(_STRIP)):
        if not all_ascii and not word.isascii():
            cjk = _CJK.findall(word)
            if cjk:   # scripts without spaces: character pairs stand in for words
                for run in cjk:
                    out.extend(run[i:i + 2] for i in range(max(1, len(run) - 1)))
                continue
        n = len(word)
        if n < MIN_WORD:
            continue
        if n > MAX_WORD:
            append(f"skip:{word[0]} {n // 10 * 10}")
            continue
        # Stripping removed any leading ".,:/-", so a number starts with a digit (\d is
        # str.isdecimal): the regex is only needed for the few words that do.
        if word[0].isdecimal() and _NUMBERISH.match(word):
            append("num:" + str(min(n, 9)))
            continue
        append(word)
    return out


def _header_tokens(f: MessageFeatures) -> Iterable[str]:
    subject = f.subject
    if not subject:
        yield "subject:none"
    else:
        for w in words(subject, 60):
            yield "subject:" + w
        # Short words in the subject matter too ("re:", "$$$", "4u").
        for raw in subject.lower().split()[:60]:
            w = raw.strip(_STRIP)
            if 0 < len(w) < MIN_WORD:
                yield "subject:" + w
        letters, upper, _non_ascii = subject_letter_counts(f)
        if letters >= 8 and upper / letters > 0.7:
            yield "subject:mostly-upper"
        if subject.count("!") >= 2:
            yield "subject:bangs"
        if not subject.isascii():
            yield "subject:non-ascii"
        if re.match(r"\s*(re|fwd?|aw|sv|tr)\s*:", subject, re.I):
            yield "subject:reply-or-forward"
    if f.from_name:
        for w in words(f.from_name, 12):
            yield "from:name:" + w
        if "@" in f.from_name:
            yield "from:name-has-address"
            named = f.from_name.rsplit("@", 1)[1].strip(" >\"'").lower()
            if named and f.from_domain and not f.from_domain.endswith(named.split()[0] if named else ""):
                yield "from:name-names-other-domain"
        brand = _brand_named(f.from_name)
        if brand and not _owns(brand, f.from_rd):
            yield "from:name-brand-mismatch"
    else:
        yield "from:no-name"
    if f.from_rd:
        yield "from:rd:" + f.from_rd
        if f.from_rd in FREEMAIL:
            yield "from:freemail"
        brand = lookalike_brand(f.from_rd)
        if brand:
            yield "from:lookalike"
    elif f.from_addr:
        yield "from:no-domain"
    else:
        yield "from:none"
    local = f.from_addr.split("@", 1)[0]
    if sum(c.isdigit() for c in local) >= 4:
        yield "from:local-digits"
    if any(k in local for k in ("noreply", "no-reply", "donotreply", "do-not-reply")):
        yield "from:noreply"
    for rd in f.reply_to_rds[:2]:
        if rd != f.from_rd:
            yield "reply-to:differs"
            if rd in FREEMAIL:
                yield "reply-to:freemail"
    if f.return_path_rd and f.from_rd and f.return_path_rd != f.from_rd:
        yield "return-path:differs"
    yield "to:" + _bucket(f.to_count)
    if f.cc_count:
        yield "cc:" + _bucket(f.cc_count)
    if f.mailer:
        name = re.split(r"[\s/(;]", f.mailer.strip().lower(), maxsplit=1)[0][:30]
        yield "mailer:" + re.sub(r"[\d.]+$", "", name)
    else:
        yield "mailer:none"
    if f.message_id_rd:
        if f.from_rd and f.message_id_rd == f.from_rd:
            yield "msgid:from-domain"
    else:
        yield "msgid:no-domain"
    if not f.has_date:
        yield "date:none"
    names = f.header_names
    for name in ("list-id", "list-unsubscribe", "list-unsubscribe-post", "auto-submitted",
                 "x-priority", "x-msmail-priority", "organization", "in-reply-to", "references"):
        if name in names:
            yield "header:" + name
    if "mime-version" not in names:
        yield "header:no-mime-version"
    precedence = f.header_values.get("precedence", "").strip().lower()[:12]
    if precedence:
        yield "precedence:" + precedence
    priority = f.header_values.get("x-priority", "").strip()[:1]
    if priority:
        yield "x-priority:" + priority
    yield "received:" + _bucket(f.received_hops)
    if f.received_unknown_rdns:
        yield "received:unknown-rdns"


def subject_letter_counts(f: MessageFeatures) -> tuple[int, int, int]:
    """``letter_counts`` of the subject (the tokenizer and the model both ask)."""
    return f.derived("subject_letters", lambda: letter_counts(f.subject))


def has_money(text: str) -> bool:
    """``_MONEY.search(text)`` found something: a match of either branch, searched apart, as the
    engine skips ahead to a branch's first character class but not to an alternation's."""
    return _MONEY_SYMBOL.search(text) is not None or _MONEY_CODE.search(text) is not None


def is_urgent(text: str) -> bool:
    """``_URGENT.search(text)`` found something. Every match begins with one of _URGENT_STARTS in
    some case, so the regex is only tried where str.find sees one in the lower-cased text (the
    regex tries every position itself, \\b first). lower() keeps positions, and equals re.I's
    matching of these letters, unless one of _CASE_ODD is there: then the regex alone."""
    if any(odd in text for odd in _CASE_ODD):
        return _URGENT.search(text) is not None
    low = text.lower()
    for start in _URGENT_STARTS:
        at = low.find(start)
        while at >= 0:
            if _URGENT.match(text, at):
                return True
            at = low.find(start, at + 1)
    return False


def money(f: MessageFeatures) -> bool:
    """The body text names an amount of money (the tokenizer and the model both ask)."""
    return f.derived("money", lambda: has_money(f.text))


def urgent(f: MessageFeatures) -> bool:
    """The body text or the subject urges (the tokenizer and the model both ask)."""
    return f.derived("urgent", lambda: is_urgent(f.text) or urgent_subject(f))


def urgent_subject(f: MessageFeatures) -> bool:
    return f.derived("urgent_subject", lambda: is_urgent(f.subject))


def emails(text: str) -> tuple[list[str], str]:
    """(the domains of the addresses in ``text``, ``text`` with each address replaced by a
    space): what _EMAILS.findall and _EMAILS.sub(" ", ...) give, from one pass that starts at
    each "@" instead of trying the regex at every position (quadratic in the length of a run
    of word characters: seconds for one 60 000-character line).

    A match has exactly one "@" (neither part can hold one), and its local part is the whole
    run of [\\w.+-] characters before that "@", cut at the end of the previous match, where the
    regex resumes its search: so the regex is tried once per "@", from that run's start."""
    domains: list[str] = []
    pieces: list[str] = []
    done = 0          # end of the previous match
    at = text.find("@")
    while at >= 0:
        start = at
        while start > done and (text[start - 1].isalnum() or text[start - 1] in "_.+-"):
            start -= 1
        match = _EMAILS.match(text, start) if start < at else None
        if match is None:
            at = text.find("@", at + 1)
            continue
        domains.append(match.group(1))
        pieces.append(text[done:start])
        pieces.append(" ")
        done = match.end()
        at = text.find("@", done)
    if not pieces:
        return domains, text
    pieces.append(text[done:])
    return domains, "".join(pieces)


def _brand_named(text: str) -> str:
    low = re.sub(r"[^a-z0-9]", "", text.lower())
    for brand in ("paypal", "microsoft", "office365", "outlook", "apple", "amazon", "netflix",
                  "docusign", "dropbox", "linkedin", "coinbase", "binance", "metamask", "wellsfargo",
                  "bankofamerica", "fedex", "usps", "dhl", "wetransfer", "sharepoint", "onedrive"):
        if brand in low:
            return brand
    return ""


def _owns(brand: str, rd: str) -> bool:
    from trustmilter.content.features import BRANDS
    return rd in BRANDS.get(brand, ())


def _body_tokens(f: MessageFeatures) -> list[str]:
    text = f.text
    out = ["text:len:" + _len_bucket(len(text))]
    stripped = _URLS.sub(" ", text)
    domains, stripped = emails(stripped)
    out.extend(["email:" + domain.lower() for domain in domains[:30]])
    body_words = words(stripped)
    out.extend(body_words)
    # Sparse bigrams from the start of the text catch phrases ("click here", "dear friend").
    head = [w for w in body_words[:MAX_BIGRAM_WORDS] if not w.startswith(("skip:", "num:"))]
    out.extend([f"bi:{a} {b}" for a, b in zip(head, head[1:])])
    if money(f):
        out.append("text:money")
    if urgent(f):
        out.append("text:urgent")
    if f.hidden_text:
        out.append("html:hidden-text")
        out.extend(["hidden:" + w for w in words(f.hidden_text, 200)])
    if f.html_present:
        out.append("html:yes")
        if not f.text_plain:
            out.append("html:only")
        if f.html_title:
            out.extend(["title:" + w for w in words(f.html_title, 20)])
    if f.image_only:
        out.append("body:image-only")
    if f.images:
        out.append("html:images:" + _bucket(f.images))
    if f.tracking_pixels:
        out.append("html:tracking-pixel")
    if f.forms:
        out.append("html:form")
    if f.password_inputs:
        out.append("html:password-field")
    if f.scripts:
        out.append("html:script")
    if f.iframes:
        out.append("html:iframe")
    out.extend(["alt:" + w for w in words(f.image_alt, 40)])
    return out


def _link_tokens(f: MessageFeatures) -> Iterable[str]:
    links = f.links
    yield "url:count:" + _bucket(len(links))
    domains = f.link_domains
    yield "url:domains:" + _bucket(len(domains))
    for d in domains[:40]:
        yield "url:rd:" + d
    seen_hosts: set[str] = set()
    for link in links[:100]:
        if link.host and link.host != link.domain and link.host not in seen_hosts and len(seen_hosts) < 40:
            seen_hosts.add(link.host)
            yield "url:host:" + link.host
        yield "url:scheme:" + link.scheme
        if link.is_ip:
            yield "url:ip-host"
        if link.has_userinfo:
            yield "url:userinfo"
        if link.idn:
            yield "url:idn"
        if link.port:
            yield "url:port"
        if link.domain in SHORTENERS or link.host in SHORTENERS:
            yield "url:shortener"
        if link.mismatched:
            yield "url:text-names-other-domain"
        if link.domain and lookalike_brand(link.domain):
            yield "url:lookalike"
        if brand_in_subdomain(link.host, link.domain):
            yield "url:brand-in-subdomain"
        if link.scheme == "data":
            yield "url:data-html"
        path = link.url.split("//", 1)[-1].split("/", 1)[1] if "/" in link.url.split("//", 1)[-1] else ""
        if path:
            for piece in re.split(r"[/?=&.#_-]+", path.lower())[:8]:
                if 3 <= len(piece) <= 12 and not piece.isdigit():
                    yield "url:path:" + piece
            if re.search(r"\.(?:php|html?|aspx?)\b", path.lower()) and re.search(r"login|signin|verify|account|secure|update", path.lower()):
                yield "url:login-page"
    if f.from_rd and domains:
        yield "url:from-domain-linked" if f.from_rd in domains else "url:from-domain-not-linked"


def _attachment_tokens(f: MessageFeatures) -> Iterable[str]:
    yield "attach:count:" + _bucket(len(f.attachments))
    for att in f.attachments[:20]:
        yield "attach:type:" + att.content_type
        if att.ext:
            yield "attach:ext:" + att.ext
            if att.ext in DANGEROUS_EXTENSIONS:
                yield "attach:dangerous"
            if att.ext in ARCHIVE_EXTENSIONS:
                yield "attach:archive"
        if att.double_ext:
            yield "attach:double-extension"
        for w in words(att.filename.replace("_", " ").replace("-", " ").replace(".", " "), 8):
            yield "attach:name:" + w
    for charset in f.charsets[:6]:
        yield "charset:" + charset.lower()
    for cte in f.encodings[:6]:
        yield "cte:" + cte
    yield "ctype:" + f.content_type
    if f.truncated:
        yield "size:truncated"


def tokenize(f: MessageFeatures) -> list[str]:
    """The distinct tokens of one message, in first-seen order."""
    out = list(dict.fromkeys(chain(_header_tokens(f), _body_tokens(f), _link_tokens(f),
                                   _attachment_tokens(f))))
    if "".join(out).isascii():
        return out
    # Lone surrogates (undecodable bytes that slipped through) cannot be stored as UTF-8.
    for i, token in enumerate(out):
        if not token.isascii():
            try:
                token.encode("utf-8")
            except UnicodeEncodeError:
                out[i] = token.encode("utf-8", "replace").decode("utf-8")
    return out
