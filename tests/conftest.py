"""Shared fixtures: a real DNS server on 127.0.0.1 and engines pointed at it."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnsserver import TestDNSServer  # noqa: E402

from trustmilter.config import load_config  # noqa: E402
from trustmilter.pipeline import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TRUSTMILTER_SHARED", ROOT.parent / "shared"))
TESTSUITES = SHARED / "testsuites"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def _dns_server() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    yield server
    server.stop()


@pytest.fixture
def dns_server(_dns_server: TestDNSServer) -> Iterator[TestDNSServer]:
    """The test DNS server, emptied for each test."""
    _dns_server.clear()
    yield _dns_server
    _dns_server.clear()


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where test engines keep SQLite state: never the machine's /var/lib/trustmilter."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def make_engine(dns_server: TestDNSServer, state_dir: Path) -> Callable[..., Engine]:
    """make_engine(overrides) -> an Engine whose resolver is the test DNS server (no cache, so
    tests that change zone data see it). The timeout is short so cued timeouts stay quick, but
    not so short that a busy 2-core CI machine (the server shares this process's GIL) turns a
    slow answer into a spurious temperror."""

    def factory(overrides: dict[str, Any] | None = None) -> Engine:
        base: dict[str, Any] = {
            "authserv_id": "mx.test.example",
            "dns": {"server": dns_server.address, "timeout": 1.5, "deadline": 6.0,
                    "cache_size": 0},
            "state": {"dir": str(state_dir)},
        }
        merged = _deep_update(copy.deepcopy(base), overrides or {})
        return Engine.from_config(load_config(None, merged))

    return factory
