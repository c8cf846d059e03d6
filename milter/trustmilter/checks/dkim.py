"""DKIM (RFC 6376): every DKIM-Signature is verified and reported, up to ``dkim.max_signatures``.

dkimpy does the canonicalization and the cryptography; this module does what dkimpy gets wrong
for a receiving MTA (see PITFALLS.md):

- ``dkim.verify`` checks only the first signature: each one is verified here, by index.
- dkimpy turns a DNS timeout/SERVFAIL during the key lookup into a plain failure. Keys are
  fetched here through the message's ``DNSSession``, so a DNS failure is a ``temperror``, never
  a ``fail``, and dnspython's global resolver is never used.
- dkimpy swallows key-record errors into ``False`` (which would read as ``fail``) and mishandles
  some legal key records (``s=email:web``). Key records are evaluated here (RFC 6376 3.6.1),
  with RFC 8301 (no rsa-sha1, RSA keys of at least ``min_rsa_bits``) and RFC 8463 (ed25519).

Results (RFC 8601 2.7.1): pass; fail = the signature or body hash does not verify, or the RSA
key is shorter than ``min_rsa_bits``; policy = verifies but with rsa-sha1 (RFC 8301 forbids
treating it as valid); permerror = malformed signature, missing/revoked/unusable key, bad tags;
temperror = the key could not be fetched (DNS timeout, SERVFAIL, deadline). Nothing raises out
of ``run``: a signature that breaks the verifier in an unforeseen way is a permerror.

The helpers ``dkimpy_message``, ``DKIMPY_LOGGER`` and ``choose_key_record`` are shared with the
ARC check (the same dkimpy glue; no results are shared that way).
"""
from __future__ import annotations

import base64
import contextlib
import binascii
import logging
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import dkim
import dkim.crypto
import dkim.util
import nacl.encoding
import nacl.exceptions
import nacl.signing
from authres.dkim_b import DKIMAuthenticationResult

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.checks.outcomes import DKIMOutcome, DKIMSignatureResult
from trustmilter.errors import DNSPermError, DNSTempError
from trustmilter.types import AuthStatus, Symbol

if TYPE_CHECKING:
    from trustmilter.message import ParsedMessage

NAME = "dkim"
DEPENDS: tuple[str, ...] = ()

log = logging.getLogger("trustmilter.checks.dkim")

# RFC 6008: header.b carries at least 8 characters of b=; more when needed to tell signatures apart.
HEADER_B_MIN = 8
# RFC 8301 3.2: verifiers MUST validate RSA keys of 1024 to 4096 bits; larger ones are legal but
# unusual, and each bit costs CPU. Used when config gives no max_rsa_bits.
DEFAULT_MAX_RSA_BITS = 8192


class _DebugAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """dkimpy logs every signature it rejects at ERROR; we report those in our results, so its
    messages are demoted to DEBUG (hostile mail must not flood the log)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


DKIMPY_LOGGER = _DebugAdapter(logging.getLogger("trustmilter.dkimpy"), {})

# A header field's start: a name (printable, no colon), optional WSP (obsolete syntax), a colon.
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+[ \t]*):")
# The end of the header block as dkimpy finds it: the first empty line, lines ending in CRLF or LF.
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_SIGNATURE_FIELD = (b"dkim-signature",)


_shared_lock = threading.Lock()

# Canonicalizing a body for its hash makes copies of it; DKIM and ARC run in concurrent threads
# and would each hold copies of a 50 MB body at once. Above this size they take turns: bounded
# memory matters more than a little latency on such rare messages.
HUGE_BODY_BYTES = 8 * 1024 * 1024
_huge_body_lock = threading.Lock()


@contextlib.contextmanager
def huge_body_turn(body: bytes) -> Iterator[None]:
    if len(body) < HUGE_BODY_BYTES:
        yield
        return
    with _huge_body_lock:
        yield


def dkimpy_message_of(message: "ParsedMessage") -> tuple[list[list[bytes]], bytes]:
    """``dkimpy_message`` of a parsed message, computed once and shared by DKIM and ARC (which
    run concurrently): the CRLF body of a 50 MB message is 50 MB. Each caller gets its own
    header lists; the body bytes are immutable and shared."""
    with _shared_lock:
        cached = getattr(message, "_dkimpy_split", None)
        if cached is None:
            cached = dkimpy_message(message.raw)
            message._dkimpy_split = cached  # type: ignore[attr-defined]
    headers, body = cached
    return [list(h) for h in headers], body


def may_hold_field(message: "ParsedMessage", names: tuple[bytes, ...]) -> bool:
    """False when no header field that ``dkimpy_message`` finds in the message can have one of
    ``names`` (lower case) as its name: its fields come from the bytes before the first empty
    line (where ``ParsedMessage.parse`` found the header block's end), or from all of the raw
    message when it has none or starts with one. Then DKIM and ARC know their answer (none)
    without the split and the relaxed canonicalization of every header, ~0.15 ms each per
    message. The lower-cased block is kept on the message: DKIM and ARC each ask twice
    (runs_inline, then run). (bytes.lower and ``in``: a case-insensitive regex costs 5 times
    more.)"""
    head = getattr(message, "_lower_head", None)
    if head is None:
        raw = message.raw
        head = (raw if raw.startswith((b"\n", b"\r\n")) else raw[:message.head_end]).lower()
        message._lower_head = head  # type: ignore[attr-defined]
    return any(name in head for name in names)


def dkimpy_message(raw: bytes) -> tuple[list[list[bytes]], bytes]:
    """The message as dkimpy holds it: ([name, value + CRLF] with folds as CRLF, CRLF body).

    dkimpy's own parser accepts LF or CRLF (it rewrites to CRLF, the canonical form signers
    hashed) but raises on a header block with one stray line ("Subject : x", a line without a
    colon, a leading continuation), which would lose every signature on the message. Then the
    same split is done tolerantly: "Name :" keeps its exact bytes (simple canonicalization
    needs them; relaxed strips the WSP as RFC 6376 3.4.2 says) and lines that have no field
    name are left out (no signature can cover a field without a name).

    Only the header block goes through the line split: splitting and re-joining a 50 MB body
    line by line cost ~180 MB and seconds (per check: DKIM and ARC both call this). The body
    gets the same LF -> CRLF rewrite with two bytes.replace, and none when it is all CRLF."""
    end = _HEADER_END.search(raw)
    if end is None or raw.startswith((b"\n", b"\r\n")):
        return _split_whole(raw)   # no body, or no header block at all: nothing big to split
    body = raw[end.end():]
    if body.count(b"\n") != body.count(b"\r\n"):
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    headers, _ = _split_whole(raw[:end.start()] + b"\r\n\r\n")
    return headers, body


def _split_whole(raw: bytes) -> tuple[list[list[bytes]], bytes]:
    try:
        headers, body = dkim.rfc822_parse(raw)
        return headers, body
    except Exception:  # noqa: BLE001 - MessageFormatError, or IndexError on a leading fold
        pass
    lines = re.split(rb"\r?\n", raw)
    headers = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if headers:
                headers[-1][1] += line + b"\r\n"
            continue
        match = _FIELD_START.match(line)
        if match:
            headers.append([match.group(1), line[match.end():] + b"\r\n"])
    return headers, b"\r\n".join(lines[i:])


def key_name(selector: bytes, domain: bytes) -> str:
    """"<s>._domainkey.<d>" as a DNS name. Raises ValueError when it cannot be one."""
    try:
        sel, dom = selector.decode("ascii"), domain.decode("ascii")
    except UnicodeDecodeError:
        # RFC 8616: a U-label d=/s= is looked up as its A-label form.
        sel = selector.decode("utf-8").encode("idna").decode("ascii")
        dom = domain.decode("utf-8").encode("idna").decode("ascii")
    name = f"{sel}._domainkey.{dom}".rstrip(".")
    if not sel or not dom or any(c.isspace() for c in name):
        raise ValueError(f"bad selector or domain: s={sel!r} d={dom!r}")
    return name


# ----- key records (RFC 6376 3.6.1) -------------------------------------------------------------

class KeyProblem(Exception):
    """The key record exists but cannot be used: permerror."""


@dataclass
class PublicKey:
    key: Any            # dkimpy RSA dict or nacl VerifyKey
    ktag: bytes         # b"rsa" | b"ed25519"
    bits: int
    testing: bool       # t=y: the signer is testing DKIM (RFC 6376 3.6.1)
    strict_identity: bool  # t=s: i= domain must equal d=


def choose_key_record(records: list[bytes]) -> bytes | None:
    """RFC 6376 3.6.2.2 leaves several TXT records at one name undefined; take the first that
    looks like a DKIM key (has p=), else the first."""
    for record in records:
        if re.search(rb"(^|;)\s*p\s*=", record):
            return record
    return records[0] if records else None


def parse_key(record: bytes, algorithm: bytes) -> PublicKey:
    try:
        tags = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList as exc:
        raise KeyProblem(f"key record syntax error ({exc})") from None
    version = tags.get(b"v")
    if version is not None and version != b"DKIM1":
        raise KeyProblem(f"key record v={version.decode('ascii', 'replace')} is not DKIM1")
    if b"p" not in tags:
        raise KeyProblem("key record has no p= tag")
    data = re.sub(rb"\s+", b"", tags[b"p"])
    if not data:
        raise KeyProblem("key revoked (empty p=)")
    ktag = tags.get(b"k", b"rsa").lower()
    family = algorithm.split(b"-", 1)[0]
    if ktag not in (b"rsa", b"ed25519"):
        raise KeyProblem(f"unknown key type k={ktag.decode('ascii', 'replace')}")
    if ktag != family:
        raise KeyProblem(f"key type k={ktag.decode()} does not match a={algorithm.decode()}")
    hashes = tags.get(b"h")
    if hashes is not None:
        allowed = {h.strip().lower() for h in hashes.split(b":")}
        wanted = algorithm.split(b"-", 1)[1]
        if wanted not in allowed:
            raise KeyProblem(f"key h= does not allow {wanted.decode()}")
    services = tags.get(b"s")
    if services is not None:
        listed = {s.strip().lower() for s in services.split(b":")}
        if not listed & {b"*", b"email"}:
            raise KeyProblem(f"key s={services.decode('ascii', 'replace')} is not for email")
    flags = {f.strip().lower() for f in tags.get(b"t", b"").split(b":")}
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise KeyProblem("key p= is not base64") from None
    if ktag == b"ed25519":
        try:
            key: Any = nacl.signing.VerifyKey(decoded)
        except (nacl.exceptions.ValueError, nacl.exceptions.TypeError, ValueError, TypeError):
            raise KeyProblem(f"ed25519 key is {len(decoded)} bytes, not 32") from None
        return PublicKey(key, ktag, 256, b"y" in flags, b"s" in flags)
    try:
        key = dkim.crypto.parse_public_key(decoded)
    except Exception as exc:  # noqa: BLE001 - UnparsableKeyError, or ASN.1 errors on hostile data
        raise KeyProblem(f"unparseable RSA key ({type(exc).__name__})") from None
    return PublicKey(key, ktag, dkim.bitsize(key["modulus"]), b"y" in flags, b"s" in flags)


# ----- one signature ----------------------------------------------------------------------------

@dataclass
class Verified:
    result: DKIMSignatureResult
    testing: bool = False
    key_bits: int = 0
    b_full: str = ""     # whole b= (whitespace removed), to make header.b unique


def _loose_tags(value: bytes) -> dict[bytes, bytes]:
    """Tags of a signature for reporting even when it does not parse strictly."""
    out: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        key, sep, val = part.partition(b"=")
        key = key.strip().lower()
        if sep and key and key not in out:
            out[key] = val.strip()
    return out


def _text(value: bytes | None, lower: bool = False) -> str:
    text = (value or b"").decode("utf-8", "replace")
    text = re.sub(r"\s+", "", text) if lower else text.strip()
    return text.lower() if lower else text


class SignatureProblem(Exception):
    """The DKIM-Signature cannot be used: permerror."""


def qp_decode(value: bytes) -> bytes:
    """dkim-quoted-printable (RFC 6376 2.11), as i= is written: "=40" is "@"; FWS is dropped."""
    value = re.sub(rb"\s+", b"", value)
    return re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), value)


def parse_signature(value: bytes) -> tuple[dict[bytes, bytes], list[bytes]]:
    """Parse and check a DKIM-Signature value (RFC 6376 3.5, 6.1.1): (tags, signed header names).

    dkimpy's own check does the tag-by-tag validation; two RFC rules it gets wrong are applied
    first: q= is a colon-separated list in which unknown methods are ignored (it must contain
    dns/txt), and i= is dkim-quoted-printable (decoded before comparing it with d=)."""
    try:
        sig = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList as exc:
        raise SignatureProblem(f"bad tag list: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes
        raise SignatureProblem(f"unparseable signature ({type(exc).__name__})") from None
    checked = dict(sig)
    if b"q" in sig:
        methods = [m.strip().lower() for m in sig[b"q"].split(b":")]
        if b"dns/txt" not in methods:
            raise SignatureProblem(f"no supported key query method in q={_text(sig[b'q'])}")
        del checked[b"q"]
    if b"i" in sig:
        checked[b"i"] = qp_decode(sig[b"i"])
    try:
        dkim.validate_signature_fields(checked)
    except dkim.DKIMException as exc:
        raise SignatureProblem(f"bad signature: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - dkimpy on hostile tag values
        raise SignatureProblem(f"unparseable signature ({type(exc).__name__})") from None
    include_headers = [h.lower() for h in re.split(rb"\s*:\s*", sig[b"h"].strip()) if h]
    if b"from" not in include_headers:
        raise SignatureProblem("From is not signed (RFC 6376 5.4)")
    return sig, include_headers


def verify_one(verifier: dkim.DKIM, header: tuple[bytes, bytes], ctx: CheckContext,
               min_bits: int, max_bits: int) -> Verified:
    """One signature; ``header`` is (name as written, raw value) from ``dkimpy_message``: simple
    canonicalization hashes the signature header exactly as it arrived."""
    header_value = header[1]
    loose = _loose_tags(header_value)
    domain = _text(loose.get(b"d"), lower=True).rstrip(".")
    selector = _text(loose.get(b"s"), lower=True)
    algorithm = _text(loose.get(b"a"), lower=True)
    b_full = re.sub(r"\s+", "", _text(loose.get(b"b")))

    def result(status: AuthStatus, reason: str, **extra: Any) -> Verified:
        return Verified(DKIMSignatureResult(status, domain, selector, b_full[:HEADER_B_MIN],
                                            algorithm, reason), b_full=b_full, **extra)

    # 1. The signature itself (RFC 6376 6.1.1).
    try:
        sig, include_headers = parse_signature(header_value)
    except SignatureProblem as exc:
        return result(AuthStatus.PERMERROR, str(exc))

    # 2. The key, through our DNS session.
    try:
        name = key_name(sig[b"s"], sig[b"d"])
    except (ValueError, UnicodeError) as exc:
        return result(AuthStatus.PERMERROR, f"no usable key name: {_short(exc)}")
    try:
        records = ctx.dns.txt(name)
    except DNSTempError as exc:
        return result(AuthStatus.TEMPERROR, f"key lookup failed: {exc}")
    except DNSPermError as exc:
        return result(AuthStatus.PERMERROR, f"key lookup: {exc}")
    record = choose_key_record(records)
    if record is None:
        return result(AuthStatus.PERMERROR, f"no key at {name}")
    try:
        key = parse_key(record, sig[b"a"].lower())
    except KeyProblem as exc:
        return result(AuthStatus.PERMERROR, f"{exc} at {name}")
    if key.strict_identity and b"i" in sig:
        i_domain = qp_decode(sig[b"i"]).rsplit(b"@", 1)[-1].lower()
        if i_domain != sig[b"d"].lower():
            return result(AuthStatus.PERMERROR, "key t=s requires i= domain equal to d=",
                          testing=key.testing)
    if key.ktag == b"rsa" and key.bits < min_bits:
        return result(AuthStatus.FAIL, f"RSA key of {key.bits} bits is shorter than {min_bits} "
                                       "(RFC 8301)", testing=key.testing, key_bits=key.bits)
    if key.ktag == b"rsa" and key.bits > max_bits:
        return result(AuthStatus.PERMERROR, f"RSA key of {key.bits} bits is longer than "
                                            f"{max_bits}", testing=key.testing, key_bits=key.bits)

    # 3. Body hash and signature (dkimpy), with the key we evaluated.
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = (
        key.key, key.bits, key.ktag, False)
    verifier.minkey = 0  # already enforced above, with a reason
    extra = {"testing": key.testing, "key_bits": key.bits}
    try:
        valid = verifier.verify_sig_process(sig, include_headers, header, None)
    except dkim.ValidationError as exc:
        if str(exc).startswith("body hash mismatch"):
            return result(AuthStatus.FAIL, "body hash mismatch", **extra)
        return result(AuthStatus.PERMERROR, _short(exc), **extra)
    except dkim.DKIMException as exc:
        return result(AuthStatus.PERMERROR, _short(exc), **extra)
    except Exception as exc:  # noqa: BLE001 - malformed b=/bh= can raise ValueError etc.
        return result(AuthStatus.PERMERROR, f"malformed signature data ({type(exc).__name__})",
                      **extra)
    if not valid:
        return result(AuthStatus.FAIL, "signature did not verify", **extra)
    if sig[b"a"].lower() == b"rsa-sha1":
        return result(AuthStatus.POLICY, "rsa-sha1 is not accepted (RFC 8301)", **extra)
    return result(AuthStatus.PASS, "", **extra)


def _short(exc: BaseException, limit: int = 120) -> str:
    """An exception as a one-line reason: dkimpy's b'...' reprs unwrapped, no quotes or
    backslashes (they end up in a quoted Authentication-Results reason)."""
    text = re.sub(r"b'([^']*)'", r"\1", " ".join(str(exc).split()))
    text = text.replace('"', "'").replace("\\", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _header_b_lengths(found: list[Verified]) -> list[int]:
    """RFC 6008 2: header.b must tell apart signatures with different b=; start at 8 chars."""
    lengths = []
    for item in found:
        length = HEADER_B_MIN
        others = [o.b_full for o in found if o.b_full != item.b_full]
        while length < len(item.b_full) and any(o.startswith(item.b_full[:length])
                                                for o in others):
            length += 1
        lengths.append(length)
    return lengths


# ----- the check --------------------------------------------------------------------------------

def verify_message(ctx: CheckContext) -> tuple[list[Verified], int]:
    """Verify the DKIM-Signatures of ``ctx.message``. Returns (results, signatures present)."""
    section = ctx.section(NAME)
    min_bits = int(section.get("min_rsa_bits", 1024))
    max_bits = int(section.get("max_rsa_bits", DEFAULT_MAX_RSA_BITS))
    limit = max(1, int(section.get("max_signatures", 8)))
    if not may_hold_field(ctx.message, _SIGNATURE_FIELD):
        return [], 0
    verifier = dkim.DKIM(None, logger=DKIMPY_LOGGER, minkey=0)
    verifier.headers, verifier.body = dkimpy_message_of(ctx.message)
    values = [(n, v) for n, v in verifier.headers if n.lower() == b"dkim-signature"]
    found: list[Verified] = []
    with huge_body_turn(verifier.body):
        for header in values[:limit]:
            found.append(verify_one(verifier, (header[0], header[1]), ctx, min_bits, max_bits))
    for item, length in zip(found, _header_b_lengths(found), strict=True):
        if length != len(item.result.b):
            res = item.result
            item.result = DKIMSignatureResult(res.status, res.domain, res.selector,
                                              item.b_full[:length], res.algorithm, res.reason)
    return found, len(values)


def _authres(item: Verified) -> DKIMAuthenticationResult:
    res = item.result
    comment = None
    if item.key_bits:
        comment = (f"{item.key_bits}-bit key" if not res.algorithm.startswith("ed25519")
                   else "ed25519 key")
        if item.testing:
            comment += "; testing"
    # authres quotes reason=, except when it holds an "@" (then it writes it bare, and a reason
    # with spaces no longer parses): addresses in reasons are written "user at domain".
    reason = res.reason.replace('"', "'").replace("\\", "/").replace("@", " at ") or None
    ar = DKIMAuthenticationResult(result=res.status.value, result_comment=comment, reason=reason)
    # Only values that are valid RFC 8601 tokens are reported (hostile d=/s= would not parse).
    if res.domain and _TOKEN.match(res.domain):
        ar.header_d = res.domain
    if res.selector and _TOKEN.match(res.selector):
        ar.header_s = res.selector
    if res.algorithm in ("rsa-sha256", "rsa-sha1", "ed25519-sha256"):
        ar.header_a = res.algorithm
    if res.b and _B64.match(res.b):
        ar.header_b = res.b
    return ar


_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_B64 = re.compile(r"^[A-Za-z0-9+/=]+$")


def _label(res: DKIMSignatureResult) -> str:
    return f"d={res.domain or '?'} s={res.selector or '?'}"


def runs_inline(ctx: CheckContext) -> bool:
    """No DKIM-Signature header: nothing to look up (DKIM_NA), no thread needed. The same test
    ``verify_message`` makes before it splits the message for dkimpy."""
    return not may_hold_field(ctx.message, _SIGNATURE_FIELD)


def run(ctx: CheckContext) -> CheckResult:
    found, present = verify_message(ctx)
    if not found:
        return CheckResult(symbols=[ctx.symbol("DKIM_NA", "no DKIM signature")],
                           authres=[DKIMAuthenticationResult(result="none")],
                           outcome=DKIMOutcome(()))
    outcome = DKIMOutcome(tuple(item.result for item in found))
    symbols = summarize(ctx, found)
    if present > len(found):
        # Said in the last symbol's reason, so the verdict shows why a signature is missing.
        last = symbols[-1]
        symbols[-1] = Symbol(last.name, last.score, f"{last.reason}; {present - len(found)} "
                                                    "more signatures not verified "
                                                    "(dkim.max_signatures)")
    return CheckResult(symbols=symbols, authres=[_authres(item) for item in found],
                       outcome=outcome)


def summarize(ctx: CheckContext, found: list[Verified]) -> list[Symbol]:
    """One symbol per kind of result, so the verdict explains itself. Any pass makes the message
    DKIM-valid (other signatures failing is normal after mailing lists). RFC 6376 3.6.1: a
    signer in testing mode (t=y) must not be treated differently from unsigned mail, so its
    failures are not scored."""
    passed = [f.result for f in found if f.result.status is AuthStatus.PASS]
    if passed:
        return [ctx.symbol("DKIM_VALID", "; ".join(f"{_label(r)} pass" for r in passed))]
    counted = [f.result for f in found if not f.testing]
    if not counted:
        return [ctx.symbol("DKIM_NA", "only testing-mode (t=y) signatures, none passed")]
    symbols = []
    groups = (("DKIM_REJECT", (AuthStatus.FAIL,)),
              ("DKIM_TEMPFAIL", (AuthStatus.TEMPERROR,)),
              ("DKIM_PERMFAIL", (AuthStatus.PERMERROR, AuthStatus.NEUTRAL, AuthStatus.POLICY)))
    for name, statuses in groups:
        hits = [r for r in counted if r.status in statuses]
        if hits:
            symbols.append(ctx.symbol(name, "; ".join(
                f"{_label(r)} {r.status.value}: {r.reason}" for r in hits[:4])))
    return symbols
