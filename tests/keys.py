"""DKIM/ARC test material made at test time: real RSA keys (openssl) and ed25519 keys (PyNaCl),
published in the test DNS server, messages signed and sealed with dkimpy; plus a runner that
puts a raw message through one check the way the pipeline does (same context, same DNS client).
"""
from __future__ import annotations

import base64
import functools
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import dkim
import nacl.encoding
import nacl.signing

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.dns import session_for
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import Engine
from trustmilter.types import Envelope


@dataclass(frozen=True)
class Key:
    algorithm: bytes      # the a= to sign with: b"rsa-sha256" | b"ed25519-sha256"
    private: bytes        # what dkimpy's sign() takes: PEM (RSA) or base64 seed (ed25519)
    public_b64: str       # the p= value
    ktag: str             # "rsa" | "ed25519"
    bits: int

    def record(self, extra: str = "") -> str:
        """The DKIM key record (RFC 6376 3.6.1) for this key."""
        return f"v=DKIM1; k={self.ktag};{' ' + extra + ';' if extra else ''} p={self.public_b64}"


@functools.lru_cache(maxsize=None)
def rsa_key(bits: int = 2048, label: str = "") -> Key:
    """A fresh RSA key of ``bits`` (``label`` tells apart several keys of one size). openssl is
    used because it generates any size, 512 bits included (needed to test RFC 8301)."""
    with tempfile.TemporaryDirectory() as tmp:
        pem_path = Path(tmp) / "key.pem"
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        f"rsa_keygen_bits:{bits}", "-out", str(pem_path)],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "pkey", "-in", str(pem_path), "-pubout", "-outform",
                              "DER"], check=True, capture_output=True).stdout
        pem = pem_path.read_bytes()
    return Key(b"rsa-sha256", pem, base64.b64encode(der).decode("ascii"), "rsa", bits)


@functools.lru_cache(maxsize=None)
def ed25519_key(label: str = "") -> Key:
    signing = nacl.signing.SigningKey.generate()
    private = signing.encode(encoder=nacl.encoding.Base64Encoder)
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode("ascii")
    return Key(b"ed25519-sha256", private, public, "ed25519", 256)


def publish(dns_server: Any, key: Key, selector: str, domain: str, extra: str = "") -> str:
    """Put the key record at <selector>._domainkey.<domain>; returns that name."""
    name = f"{selector}._domainkey.{domain}"
    dns_server.add(name, "TXT", key.record(extra))
    return name


MESSAGE = (b"From: Alice Example <alice@example.org>\r\n"
           b"To: Bob <bob@example.net>\r\n"
           b"Subject: Quarterly figures\r\n"
           b"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
           b"Message-ID: <figures-1@example.org>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Hello Bob,\r\n"
           b"\r\n"
           b"the figures are attached in spirit.\r\n"
           b"-- \r\n"
           b"Alice\r\n")


def sign(message: bytes, key: Key, selector: str, domain: str, *,
         algorithm: bytes | None = None,
         canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
         include_headers: list[bytes] | None = None) -> bytes:
    """``message`` with a DKIM-Signature by dkimpy prepended."""
    header = dkim.sign(message, selector.encode(), domain.encode(), key.private,
                       signature_algorithm=algorithm or key.algorithm, canonicalize=canonicalize,
                       include_headers=include_headers)
    return header + message


def arc_seal(message: bytes, key: Key, selector: str, domain: str, srv_id: str,
             results: str) -> bytes:
    """What an ARC sealer does: add its Authentication-Results (``results``: the resinfo part,
    e.g. "spf=pass smtp.mailfrom=example.org"), then prepend the ARC set dkimpy computes."""
    with_ar = f"Authentication-Results: {srv_id}; {results}\r\n".encode() + message
    arc_set = dkim.arc_sign(with_ar, selector.encode(), domain.encode(), key.private,
                            srv_id.encode())
    assert arc_set, "dkimpy did not seal (no Authentication-Results of the sealer?)"
    return b"".join(arc_set) + with_ar


def run_check(module: ModuleType, engine: Engine, raw: bytes,
              envelope: Envelope | None = None) -> CheckResult:
    """One check on one message, as pipeline.evaluate runs it (a fresh DNS session with the
    configured deadline, the engine's resolver)."""
    deadline = float(engine.config.section("dns")["deadline"])
    ctx = CheckContext(envelope=envelope or Envelope(client_ip="192.0.2.1"),
                       message=ParsedMessage.parse(raw),
                       dns=session_for(engine.resolver, deadline), config=engine.config,
                       engine=engine)
    return module.run(ctx)
