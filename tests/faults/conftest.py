"""Shared harness for the fault tests: per test module one real Postfix (the MX) with
``trustmilter serve`` in front of its smtpd, a real DNS server with the test zone, and a second
Postfix (the "front", a sending MTA) that relays to the MX. Mail sent through the front shows what
a real sender's queue does with a 4xx from the MX: it keeps the message and retries it, so a
deferred message must arrive once the fault clears.

The MX trusts the front (127.0.0.1) as a relay: the milter judges the first untrusted Received hop,
which is the XCLIENT address the test gave the front (192.0.2.10, good.test's SPF network).
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))
sys.path.insert(0, str(HERE.parent))

from dnsserver import TestDNSServer  # noqa: E402
from postfix import MilterProcess, PostfixInstance, postfix_available  # noqa: E402
from test_milter_postfix import milter_config, rsa_key, zone  # noqa: E402

REPO = HERE.parent.parent


def skip_without_postfix() -> list[Any]:
    marks: list[Any] = [pytest.mark.postfix]
    why = postfix_available()
    if why:
        marks.append(pytest.mark.skip(reason=why))
    return marks


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g}s\n{detail()}")
        time.sleep(0.1)


class Harness:
    """The MX Postfix, its milter, the front Postfix and the DNS server of one test module."""

    def __init__(self, dns: TestDNSServer, mx: PostfixInstance, milter: MilterProcess,
                 front: PostfixInstance, base_config: dict[str, Any]) -> None:
        self.dns = dns
        self.mx = mx
        self.milter = milter
        self.front = front
        self.base_config = base_config

    def config(self, **sections: Any) -> dict[str, Any]:
        """The module's base config with whole sections replaced or merged (dicts merge)."""
        import copy
        out = copy.deepcopy(self.base_config)
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key].update(value)
            else:
                out[key] = value
        return out

    def detail(self) -> str:
        return (f"front queue: {self.front.queue()}\n--- front log:\n{self.front.log_tail(15)}"
                f"\n--- mx log:\n{self.mx.log_tail(15)}\n--- milter:\n"
                f"{self.milter.log_text()[-2500:]}")

    def deferred_replies(self, since: int = 0) -> list[str]:
        """The MX's replies the front logged for deferred deliveries (what the sender's MTA
        saw), after character offset ``since`` of the front's log."""
        return re.findall(r"status=deferred \(host \S+ said: (.*?)\)$",
                          self.front.log_text()[since:], re.M)

    def wait_all_delivered(self, ids: list[str], timeout: float = 60.0) -> dict[str, bytes]:
        """Flush the front until its queue is empty, then return each message's delivered copy
        (exactly one copy each)."""
        def drained() -> bool:
            self.front.flush()
            return not self.front.queue()
        wait_for(drained, timeout, "front queue drained", self.detail)
        got = {msgid: self.mx.find_delivered(msgid, timeout=30) for msgid in ids}
        for msgid in ids:
            copies = [raw for raw in self.mx.delivered() if msgid.encode() in raw]
            assert len(copies) == 1, f"{msgid} delivered {len(copies)} times"
        return got


def base_milter_config(dns: TestDNSServer, workdir: Path) -> dict[str, Any]:
    config = milter_config(dns, workdir / "trustmilter.log")
    # Short DNS limits keep slow-DNS tests short; the deadline still ends evaluation.
    config["dns"] = {"server": dns.address, "timeout": 0.5, "deadline": 2.0, "cache_size": 0}
    config["trusted_relays"] = ["127.0.0.1/32", "198.51.100.7/32"]
    return config


@pytest.fixture(scope="module")
def fault_dns() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    zone(server, rsa_key(1024)[1])
    yield server
    server.stop()


def build_harness(dns: TestDNSServer,
                  prepare: Callable[[Path, dict[str, Any]], None] | None = None,
                  cleanup: Callable[[Path], None] | None = None) -> Iterator[Harness]:
    """Start DNS-backed MX + milter + front. ``prepare(workdir, config)`` may change the milter's
    config (and the filesystem) before it starts; ``cleanup(workdir)`` runs after it stopped."""
    mx = PostfixInstance.create(prefix="tm-fault-")
    workdir = mx.base / "milter"
    workdir.mkdir(parents=True, exist_ok=True)
    mx.milters = f"unix:{workdir / 'tm.sock'}"
    mx.write_config()
    config = base_milter_config(dns, workdir)
    front = PostfixInstance.create(prefix="tm-ffront-", domains=(), hostname="front.test.example",
                                   sink=f"relay:[127.0.0.1]:{mx.port}",
                                   # XCLIENT makes the client 192.0.2.10: allowed to relay.
                                   extra_main={"mynetworks": "127.0.0.0/8, 192.0.2.0/24"})
    milter: MilterProcess | None = None
    try:
        if prepare is not None:
            prepare(workdir, config)
        milter = MilterProcess(workdir, config, mx.milters)
        milter.start()
        mx.start()
        front.start()
        yield Harness(dns, mx, milter, front, config)
    finally:
        # In parallel: a clean milter stop waits ~5 s on libmilter's listener, each Postfix ~2 s.
        import threading
        stoppers = [threading.Thread(target=front.destroy), threading.Thread(target=mx.stop)]
        if milter is not None:
            stoppers.append(threading.Thread(target=milter.stop))
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(60)
        if cleanup is not None:
            cleanup(workdir)
        mx.destroy()


@pytest.fixture(scope="module")
def harness(fault_dns: TestDNSServer) -> Iterator[Harness]:
    yield from build_harness(fault_dns)


@pytest.fixture
def h(harness: Harness) -> Iterator[Harness]:
    """Per test: DNS behaves, the milter runs with the module's base config."""
    harness.dns.default_behaviour = None
    assert harness.milter.proc is not None and harness.milter.proc.poll() is None, \
        harness.milter.log_text()[-2000:]
    yield harness
    harness.dns.default_behaviour = None
