"""The load test's mail: the DNS zone the senders live in, the plan of SMTP connections (who
connects, which messages it sends) and the messages themselves.

The plan is cheap and made once by the runner (it names every Message-ID that will be sent, so
the runner can account for each even if a client process dies); the message bytes are built by
the client processes from the plan (DKIM signing with real keys is the expensive part).

Categories, each with its own senders and client addresses (distinct /24s, so IP reputation
earned by one category does not move another's verdicts):

- ``dkim_rsa2048`` / ``dkim_rsa1024`` / ``dkim_ed25519``: authenticated mail (SPF pass, DKIM
  pass, DMARC pass, forward-confirmed PTR);
- ``forged_ar``: like dkim_rsa2048 with a forged Authentication-Results claiming our authserv-id
  (which must be gone from the delivered copy) and another host's one (which must stay);
- ``dkim_broken``: signed, then the body altered (DKIM fails, SPF still passes);
- ``spf_softfail``, ``spf_fail`` (DMARC p=none), ``no_auth`` (no DNS records at all);
- ``dmarc_reject`` (bank.test, p=reject, sent from elsewhere: must be refused with 5xx),
  ``dmarc_quarantine`` (shop.test, p=quarantine: held);
- ``gtube_reject`` / ``gtube_quarantine`` / ``gtube_junk`` (rules/gtube.yaml);
- ``helo_not_fqdn`` (a dotless HELO; the config scores it 9, over the junk threshold);
- ``dnsbl`` (client address listed in the test zone's spamcop and psbl);
- ``tempfail_once``: the From domain's DMARC record answers SERVFAIL the first time it is asked
  (dmarc.temperror_action: tempfail), so the milter says 451 once and the retry is delivered;
- ``corpus_ham`` / ``corpus_spam`` (with --corpus): SpamAssassin corpus messages.
"""
from __future__ import annotations

import base64
import email.utils
import ipaddress
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dnslib import RCODE, DNSRecord

from dnsserver import TestDNSServer
from keys import Key, ed25519_key, rsa_key, sign

AUTHSERV = "mx.test.example"
RCPT_DOMAIN = "dest.test"
# What a forged header claims: must never be seen in a delivered copy.
FORGED_MARK = "forged-by-loadtest.invalid"
OTHER_AUTHSERV = "relay.other.example"

GTUBE = {
    "reject": "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
    "quarantine": "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-QUARANTINE*C.34X",
    "junk": "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-JUNK*C.34X",
}

# Client networks (global addresses: the DNSBL check skips documentation and private ranges).
# Nothing here leaves the machine: every lookup goes to the test DNS server.
GOOD_NET, PARTNER_NET, LISTS_NET = "81.2.69", "81.2.70", "81.2.71"
SOFT_NET, FAIL_NET = "81.2.72", "81.2.73"    # the domains' own (unused) SPF networks
OTHER_NET = "45.33"                           # 45.33.0-3.1-100: unauthenticated senders
ATTACK_NET = "185.100.87"                     # spoofers and GTUBE senders
LISTED_NET = "185.220.101"                    # listed in the test DNSBLs
LISTED_HOSTS = 8
DNSBL_ZONES = ("bl.spamcop.net", "psbl.surriel.com")   # enabled in the shipped defaults

# (weight in percent, category). The actions some of them force are in EXPECTED.
CATEGORIES: list[tuple[int, str]] = [
    (25, "dkim_rsa2048"), (10, "dkim_rsa1024"), (8, "dkim_ed25519"), (5, "forged_ar"),
    (3, "dkim_broken"), (8, "spf_softfail"), (6, "spf_fail"), (8, "no_auth"),
    (5, "dmarc_reject"), (3, "dmarc_quarantine"), (3, "gtube_reject"), (3, "gtube_quarantine"),
    (4, "gtube_junk"), (3, "helo_not_fqdn"), (5, "dnsbl"), (1, "tempfail_once"),
]

# Actions a category's forced action allows (a forced action wins unless the score asks for
# something stronger). Categories not named here go by score: any action is consistent.
EXPECTED: dict[str, set[str]] = {
    "dmarc_reject": {"reject"},
    "gtube_reject": {"reject"},
    "gtube_quarantine": {"quarantine", "reject"},
    "dmarc_quarantine": {"quarantine", "reject"},
    "gtube_junk": {"junk", "quarantine", "reject"},
}


# ---- the zone -----------------------------------------------------------------------------------
@dataclass
class KeySet:
    """The DKIM keys the senders sign with (published in the zone)."""

    rsa2048: Key
    rsa1024: Key
    ed25519: Key

    @classmethod
    def make(cls) -> "KeySet":
        return cls(rsa_key(2048, "load"), rsa_key(1024, "load"), ed25519_key("load"))

    def to_json(self) -> dict[str, Any]:
        return {name: {"algorithm": k.algorithm.decode(), "private": k.private.decode(),
                       "public_b64": k.public_b64, "ktag": k.ktag, "bits": k.bits}
                for name, k in asdict_keys(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KeySet":
        keys = {name: Key(v["algorithm"].encode(), v["private"].encode(), v["public_b64"],
                          v["ktag"], int(v["bits"])) for name, v in data.items()}
        return cls(**keys)


def asdict_keys(keys: KeySet) -> dict[str, Key]:
    return {"rsa2048": keys.rsa2048, "rsa1024": keys.rsa1024, "ed25519": keys.ed25519}


# Which key signs for which domain, and with which selector.
SIGNERS = {"dkim_rsa2048": ("rsa2048", "load2048", "good.test"),
           "forged_ar": ("rsa2048", "load2048", "good.test"),
           "dkim_broken": ("rsa2048", "load2048", "good.test"),
           "dkim_rsa1024": ("rsa1024", "load1024", "partner.test"),
           "dkim_ed25519": ("ed25519", "loaded", "lists.test")}


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def publish_zone(dns: TestDNSServer, keys: KeySet) -> None:
    """Every record the senders need; everything else is NXDOMAIN, answered at once."""
    dns.add("good.test", "TXT", f"v=spf1 ip4:{GOOD_NET}.0/24 -all")
    dns.add("_dmarc.good.test", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@good.test")
    dns.add("partner.test", "TXT", f"v=spf1 ip4:{PARTNER_NET}.0/24 ~all")
    dns.add("_dmarc.partner.test", "TXT", "v=DMARC1; p=none")
    dns.add("lists.test", "TXT", f"v=spf1 ip4:{LISTS_NET}.0/24 -all")
    dns.add("_dmarc.lists.test", "TXT", "v=DMARC1; p=quarantine")
    for name, (key, selector, domain) in SIGNERS.items():
        if name in ("forged_ar", "dkim_broken"):
            continue
        k = asdict_keys(keys)[key]
        dns.add(f"{selector}._domainkey.{domain}", "TXT", k.record())
    for net, host, domain, count in ((GOOD_NET, "mail", "good.test", 50),
                                     (PARTNER_NET, "smtp", "partner.test", 20),
                                     (LISTS_NET, "out", "lists.test", 10)):
        for n in range(1, count + 1):
            ip = f"{net}.{n}"
            dns.add(f"{host}{n}.{domain}", "A", ip)
            dns.add(reverse_name(ip), "PTR", f"{host}{n}.{domain}.")
    dns.add("soft.test", "TXT", f"v=spf1 ip4:{SOFT_NET}.0/24 ~all")
    dns.add("_dmarc.soft.test", "TXT", "v=DMARC1; p=none")
    dns.add("fail.test", "TXT", f"v=spf1 ip4:{FAIL_NET}.0/24 -all")
    dns.add("_dmarc.fail.test", "TXT", "v=DMARC1; p=none")
    dns.add("bank.test", "TXT", "v=spf1 ip4:81.2.74.0/24 -all")
    dns.add("_dmarc.bank.test", "TXT", "v=DMARC1; p=reject")
    dns.add("shop.test", "TXT", "v=spf1 -all")
    dns.add("_dmarc.shop.test", "TXT", "v=DMARC1; p=quarantine")
    # tempfail_once: t<N>.tempfail.test has an SPF record (wildcard) and the organizational
    # domain's DMARC policy; its own _dmarc name fails once (LoadDNSServer).
    dns.add("*.tempfail.test", "TXT", "v=spf1 ?all")
    dns.add("_dmarc.tempfail.test", "TXT", "v=DMARC1; p=none")
    for n in range(1, LISTED_HOSTS + 1):
        label = ".".join(reversed(f"{LISTED_NET}.{n}".split(".")))
        for zone in DNSBL_ZONES:
            dns.add(f"{label}.{zone}", "A", "127.0.0.2")
            dns.add(f"{label}.{zone}", "TXT", "listed by the load test")


class LoadDNSServer(TestDNSServer):
    """The test DNS server, plus: a ``_dmarc.*.tempfail.test`` name answers SERVFAIL for
    FAIL_WINDOW seconds from its first query, then the zone's answer. So each tempfail_once
    message is tempfailed by the milter on its first attempt, even if the resolver asked twice,
    and its retry (the client waits at least a second, load_client.BACKOFF) is answered."""

    FAIL_WINDOW = 0.9

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._first_asked: dict[str, float] = {}
        self._once_lock = threading.Lock()
        self.served_once = 0

    def _answer(self, data: bytes, transport: str) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - the base class drops what it cannot parse
            return super()._answer(data, transport)
        qname = ".".join(label.decode("ascii", "replace") for label in request.q.qname.label)
        qname = qname.rstrip(".").lower()
        if (qname.startswith("_dmarc.") and qname.endswith(".tempfail.test")
                and qname != "_dmarc.tempfail.test"):
            now = time.monotonic()
            with self._once_lock:
                first = self._first_asked.setdefault(qname, now)
                failing = now - first < self.FAIL_WINDOW
                if failing:
                    self.served_once += 1
            if failing:
                reply = request.reply()
                reply.header.ra = 1
                reply.header.rcode = RCODE.SERVFAIL
                return reply.pack()
        return super()._answer(data, transport)


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class Profile:
    """The SMTP client as the milter sees it (set with XCLIENT)."""

    ip: str
    helo: str
    name: str = "[UNAVAILABLE]"   # the client hostname Postfix would have found


@dataclass
class MessageSpec:
    msgid: str
    category: str
    mail_from: str
    rcpt: str
    size: int                    # bytes to aim for (generated messages)
    shape: str                   # plain | html | alternative | attachment
    seed: int
    corpus_path: str = ""        # corpus messages: the file


@dataclass
class Connection:
    profile: Profile
    messages: list[MessageSpec] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Connection":
        return cls(Profile(**data["profile"]), [MessageSpec(**m) for m in data["messages"]])


def _size(rng: random.Random) -> int:
    """1 KB to 400 KB, most of them small (as inbound mail is): median ~4 KB, mean ~28 KB."""
    bucket = rng.random()
    if bucket < 0.55:
        return rng.randint(1_000, 6_000)
    if bucket < 0.85:
        return rng.randint(6_000, 40_000)
    if bucket < 0.97:
        return rng.randint(40_000, 150_000)
    return rng.randint(150_000, 400_000)


def _shape(rng: random.Random, size: int) -> str:
    if size > 64_000 and rng.random() < 0.7:
        return "attachment"
    return rng.choices(["plain", "html", "alternative", "attachment"], [40, 15, 25, 20])[0]


def _sender(category: str, rng: random.Random, unique: str) -> tuple[Profile, str]:
    """(client, envelope sender) for one connection of ``category``."""
    def other_ip() -> str:
        return f"{OTHER_NET}.{rng.randint(0, 3)}.{rng.randint(1, 100)}"

    user = rng.choice(["alice", "bob", "news", "billing", "support", "carol", "dave", "info"])
    if category in ("dkim_rsa2048", "forged_ar", "dkim_broken"):
        n = rng.randint(1, 50)
        return (Profile(f"{GOOD_NET}.{n}", f"mail{n}.good.test", f"mail{n}.good.test"),
                f"{user}@good.test")
    if category == "dkim_rsa1024":
        n = rng.randint(1, 20)
        return (Profile(f"{PARTNER_NET}.{n}", f"smtp{n}.partner.test", f"smtp{n}.partner.test"),
                f"{user}@partner.test")
    if category == "dkim_ed25519":
        n = rng.randint(1, 10)
        return (Profile(f"{LISTS_NET}.{n}", f"out{n}.lists.test", f"out{n}.lists.test"),
                f"list-{user}@lists.test")
    if category == "spf_softfail" or category.startswith("gtube_"):
        ip = other_ip() if category == "spf_softfail" else f"{ATTACK_NET}.{rng.randint(1, 254)}"
        return Profile(ip, f"mx{rng.randint(1, 99)}.soft.test"), f"{user}@soft.test"
    if category == "spf_fail":
        return Profile(other_ip(), f"relay{rng.randint(1, 99)}.fail.test"), f"{user}@fail.test"
    if category == "no_auth":
        domain = f"d{rng.randint(1, 100)}.noauth.test"
        return Profile(other_ip(), f"mail.{domain}"), f"{user}@{domain}"
    if category == "dmarc_reject":
        return (Profile(f"{ATTACK_NET}.{rng.randint(1, 254)}", "mail.attacker.test"),
                "security@bank.test")
    if category == "dmarc_quarantine":
        return (Profile(f"{ATTACK_NET}.{rng.randint(1, 254)}", "smtp.attacker.test"),
                "orders@shop.test")
    if category == "helo_not_fqdn":
        domain = f"d{rng.randint(1, 100)}.noauth.test"
        return Profile(other_ip(), f"WIN-{rng.randint(1000, 9999)}"), f"{user}@{domain}"
    if category == "dnsbl":
        return (Profile(f"{LISTED_NET}.{rng.randint(1, LISTED_HOSTS)}", "bulk.soft.test"),
                f"{user}@soft.test")
    if category == "tempfail_once":
        domain = f"t{unique}.tempfail.test"
        return Profile(other_ip(), f"mail.{domain}"), f"{user}@{domain}"
    raise ValueError(category)


def plan(count: int, run: int, seed: int = 1, corpus: list[tuple[Path, str]] | None = None,
         corpus_share: float = 0.25) -> list[Connection]:
    """At least ``count`` messages (exactly ``count``), grouped in connections: 65 % of the
    connections carry one message, the rest 2 to 6 (a sender with a queue for us). The same
    ``seed`` gives the same load for every ``run``; only the Message-IDs (and so the DKIM
    signatures) differ."""
    rng = random.Random(seed)
    weights = [w for w, _ in CATEGORIES]
    names = [c for _, c in CATEGORIES]
    out: list[Connection] = []
    total = 0
    while total < count:
        per = 1 if rng.random() < 0.65 else rng.randint(2, 6)
        per = min(per, count - total)
        conn_no = len(out)
        if corpus and rng.random() < corpus_share:
            category = "corpus"
        else:
            category = rng.choices(names, weights)[0]
        if category == "tempfail_once":
            per = 1
        if category == "corpus":
            profile = Profile(f"{OTHER_NET}.{rng.randint(4, 7)}.{rng.randint(1, 100)}",
                              f"mail{rng.randint(1, 99)}.corpus.test")
            conn = Connection(profile)
            for _ in range(per):
                path, label = corpus[rng.randrange(len(corpus))]  # type: ignore[index]
                conn.messages.append(MessageSpec(
                    msgid=f"<load.{run}.{total}.{rng.getrandbits(32):08x}@corpus.test>",
                    category=f"corpus_{label}", mail_from="", rcpt=_rcpt(rng), size=0,
                    shape="corpus", seed=rng.getrandbits(32), corpus_path=str(path)))
                total += 1
        else:
            profile, mail_from = _sender(category, rng, f"{run}x{conn_no}")
            conn = Connection(profile)
            domain = mail_from.rsplit("@", 1)[1]
            for _ in range(per):
                size = _size(rng)
                conn.messages.append(MessageSpec(
                    msgid=f"<load.{run}.{total}.{rng.getrandbits(32):08x}@{domain}>",
                    category=category, mail_from=mail_from, rcpt=_rcpt(rng), size=size,
                    shape=_shape(rng, size), seed=rng.getrandbits(32)))
                total += 1
        out.append(conn)
    return out


def _rcpt(rng: random.Random) -> str:
    # One recipient per message: the test Postfix files every recipient of dest.test in the
    # same Maildir, so two recipients would be two copies.
    return f"user{rng.randint(1, 500)}@{RCPT_DOMAIN}"


# ---- the messages -------------------------------------------------------------------------------
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have "
         "from or one had by word but not what all were we when your can said there use an each "
         "which she do how their if will up other about out many then them these so some her "
         "would make like him into time has look two more write go see number no way could "
         "people my than first water been call who oil its now find long down day did get come "
         "made may part meeting report quarterly budget project schedule review invoice order "
         "delivery account update team office agenda notes figures summary draft proposal "
         "contract customer service support release version server network backup storage "
         "please thanks regards tomorrow monday friday afternoon morning week month year plan "
         "offer price discount free limited today click subscribe newsletter event ticket").split()


class Writer:
    """Builds message bytes from a spec. One per client process: a pool of prose made once, so
    a 300 KB body costs a slice, not 50,000 random choices."""

    def __init__(self, keys: KeySet, seed: int = 7) -> None:
        self.keys = keys
        rng = random.Random(seed)
        sentences = []
        while sum(len(s) for s in sentences) < 600_000:
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
            sentences.append(" ".join(words).capitalize() + ".")
        self.prose = " ".join(sentences)

    def text(self, rng: random.Random, size: int) -> str:
        """About ``size`` characters of prose in paragraphs, lines under 78 characters."""
        size = max(200, size)
        start = rng.randrange(0, len(self.prose) - min(size, len(self.prose) - 1) - 1)
        chunk = self.prose[start:start + size]
        lines, line = [], []
        width = 0
        for word in chunk.split(" "):
            if width + len(word) > 72:
                lines.append(" ".join(line))
                line, width = [], 0
                if rng.random() < 0.15:
                    lines.append("")
            line.append(word)
            width += len(word) + 1
        lines.append(" ".join(line))
        return "\r\n".join(lines)

    def build(self, spec: MessageSpec) -> tuple[str, bytes]:
        """(envelope sender, message bytes with CRLF line ends)."""
        if spec.category.startswith("corpus_"):
            return corpus_message(spec)
        rng = random.Random(spec.seed)
        domain = spec.mail_from.rsplit("@", 1)[1]
        subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))).capitalize()
        headers = [
            f"From: {spec.mail_from.split('@')[0].title()} <{spec.mail_from}>",
            f"To: <{spec.rcpt}>",
            f"Subject: {subject}",
            f"Date: {email.utils.formatdate(localtime=False)}",
            f"Message-ID: {spec.msgid}",
            "MIME-Version: 1.0",
        ]
        if spec.category == "dkim_ed25519":
            headers.append("List-Id: <news.lists.test>")
            headers.append(f"List-Unsubscribe: <https://lists.test/u/{rng.getrandbits(40):x}>")
        budget = max(300, spec.size - 600)
        gtube = GTUBE.get(spec.category.removeprefix("gtube_")) if spec.category.startswith(
            "gtube_") else None
        content_type, body = self._body(rng, spec.shape, budget, domain, gtube)
        raw = ("\r\n".join(headers + [content_type]) + "\r\n\r\n").encode() + body
        signer = SIGNERS.get(spec.category)
        if signer is not None:
            key = asdict_keys(self.keys)[signer[0]]
            raw = sign(raw, key, signer[1], signer[2],
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                                        b"mime-version", b"content-type"])
            if spec.category == "dkim_broken":
                raw = raw + b"-- \r\nAdded by a mailing list footer after signing.\r\n"
            if spec.category == "forged_ar":
                claimed = AUTHSERV if rng.random() < 0.5 else AUTHSERV.upper()
                raw = (f"Authentication-Results: {claimed}; dkim=pass header.d={FORGED_MARK};"
                       f"\r\n\tspf=pass smtp.mailfrom=ceo@{FORGED_MARK}\r\n"
                       f"Authentication-Results: {OTHER_AUTHSERV}; spf=pass "
                       f"smtp.mailfrom={spec.mail_from}\r\n").encode() + raw
        return spec.mail_from, raw

    def _body(self, rng: random.Random, shape: str, budget: int, domain: str,
              gtube: str | None) -> tuple[str, bytes]:
        if shape == "attachment":
            text_part = min(budget, rng.randint(300, 3000))
            attach = max(200, budget - text_part)
        else:
            text_part, attach = budget, 0
        text = self.text(rng, text_part if shape in ("plain", "attachment") else text_part // 2)
        if gtube:
            # Near the top, as people send it: the content checks read a message's first
            # content.max_bytes / max_text_chars only, so at the end of a 150 KB text part the
            # string is (rightly) not seen.
            text = f"{gtube}\r\n\r\n{text}"
        plain = ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit",
                 text + "\r\n")
        if shape == "plain":
            return plain[0], plain[1].encode()
        html = self.html(rng, text, domain)
        if shape == "html":
            return ("Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit",
                    html.encode())
        boundary = f"=_load_{rng.getrandbits(48):012x}"
        if shape == "alternative":
            parts = [plain, ("Content-Type: text/html; charset=utf-8", html)]
            return (f'Content-Type: multipart/alternative; boundary="{boundary}"',
                    _multipart(boundary, parts))
        name, ctype = rng.choice([("invoice-{n}.pdf", "application/pdf"),
                                  ("photo-{n}.png", "image/png"),
                                  ("archive-{n}.zip", "application/zip"),
                                  ("report-{n}.docx", "application/vnd.openxmlformats-"
                                   "officedocument.wordprocessingml.document")])
        name = name.format(n=rng.randint(100, 999))
        payload = base64.encodebytes(rng.randbytes(attach * 3 // 4)).replace(b"\n", b"\r\n")
        parts = [plain, (f'Content-Type: {ctype}; name="{name}"\r\nContent-Transfer-Encoding: '
                         f'base64\r\nContent-Disposition: attachment; filename="{name}"',
                         payload.decode())]
        return (f'Content-Type: multipart/mixed; boundary="{boundary}"',
                _multipart(boundary, parts))

    def html(self, rng: random.Random, text: str, domain: str) -> str:
        paras = [p for p in text.split("\r\n\r\n") if p.strip()]
        links = [f'<p><a href="https://www.{domain}/p/{rng.getrandbits(32):x}">'
                 f'{rng.choice(WORDS)} {rng.choice(WORDS)}</a></p>'
                 for _ in range(rng.randint(1, 4))]
        body = "\r\n".join(f"<p>{p}</p>" for p in paras)
        return ("<!DOCTYPE html>\r\n<html><head><meta charset=\"utf-8\"></head><body>\r\n"
                f"{body}\r\n{''.join(links)}\r\n</body></html>\r\n")


def _multipart(boundary: str, parts: list[tuple[str, str]]) -> bytes:
    out = ["This is a multi-part message in MIME format.", ""]
    for headers, content in parts:
        out += [f"--{boundary}", headers, "", content.rstrip("\r\n")]
    out += [f"--{boundary}--", ""]
    return "\r\n".join(out).encode()


_MSGID = re.compile(rb"^Message-ID:[^\n]*\n(?:[ \t][^\n]*\n)*", re.I | re.M)
_FROM = re.compile(rb"^From:.*?([\w.+-]+@[\w.-]+\w)", re.I | re.M)


def corpus_message(spec: MessageSpec) -> tuple[str, bytes]:
    """A corpus message with CRLF line ends and its Message-ID replaced by the spec's (corpus
    messages repeat when the run is longer than the corpus: each sending is its own message)."""
    raw = Path(spec.corpus_path).read_bytes()
    if raw.startswith(b"From ") and b"\n" in raw:
        raw = raw.split(b"\n", 1)[1]           # mbox separator line
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        head, body = raw, b""
    head = _MSGID.sub(b"", head.rstrip(b"\n") + b"\n")
    head += f"Message-ID: {spec.msgid}\n".encode()
    match = _FROM.search(head)
    sender = match.group(1).decode("ascii", "replace") if match else "sender@corpus.test"
    raw = re.sub(rb"\r?\n", b"\r\n", head + b"\n" + body)
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return sender, raw


def message_id_of(head: bytes) -> str | None:
    """The Message-ID in a header block (bytes up to the empty line)."""
    match = re.search(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", head, re.I | re.M)
    return match.group(1).decode("ascii", "replace") if match else None


__all__ = ["AUTHSERV", "CATEGORIES", "Connection", "EXPECTED", "FORGED_MARK", "KeySet",
           "LoadDNSServer", "MessageSpec", "OTHER_AUTHSERV", "Profile", "Writer",
           "message_id_of", "plan", "publish_zone"]
