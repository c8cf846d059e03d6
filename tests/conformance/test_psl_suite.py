"""The Public Suffix List's own test list (publicsuffix/list tests/tests.txt), every case, through
the organizational-domain code DMARC uses (trustmilter.psl, loaded by the engine from
``dmarc.psl_file``) with the list file the expectations were written against.

A case is ``<input> <expected registrable domain>``; ``null`` is "no input" / "no registrable
domain" (the input is a public suffix, has a leading dot, or is empty)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import TESTSUITES
from trustmilter import psl
from trustmilter.config import load_config
from trustmilter.pipeline import Engine

SUITE_DIR = TESTSUITES / "psl"
LIST_FILE = SUITE_DIR / "public_suffix_list.dat"
CASES_FILE = SUITE_DIR / "tests.txt"

pytestmark = pytest.mark.conformance


def _cases() -> list[Any]:
    if not CASES_FILE.is_file():
        return [pytest.param(None, None, id="suite-missing", marks=pytest.mark.skip(
            reason=f"PSL tests not found at {SUITE_DIR} (set TRUSTMILTER_SHARED)"))]
    cases = []
    for lineno, line in enumerate(CASES_FILE.read_text("utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        given, expected = line.split()
        cases.append(pytest.param(None if given == "null" else given,
                                  None if expected == "null" else expected,
                                  id=f"line{lineno}:{given}"))
    return cases


@pytest.fixture(scope="module")
def orgs() -> Iterator[psl.OrgDomains]:
    # The engine path: dmarc.psl_file -> setup -> engine.cached, as in production.
    config = load_config(None, {"authserv_id": "mx.test.example",
                                "dns": {"server": "127.0.0.1:9", "cache_size": 0},
                                "dmarc": {"psl_file": str(LIST_FILE)}})
    engine = Engine.from_config(config)
    assert "dmarc" not in engine.disabled, engine.disabled
    loaded = psl.for_engine(engine)
    assert Path(loaded.source) == LIST_FILE and loaded.has_private_section
    yield loaded


def test_case_count_matches_the_canonical_list() -> None:
    """tests.txt and test_psl.txt carry the same 78 active cases (README); a truncated copy
    must not pass as a full run."""
    if not CASES_FILE.is_file():
        pytest.skip("PSL tests not found")
    canonical = [line for line in (SUITE_DIR / "test_psl.txt").read_text("utf-8").splitlines()
                 if line.startswith("checkPublicSuffix(")]
    assert len(_cases()) == len(canonical) == 78


@pytest.mark.parametrize(("given", "expected"), _cases())
def test_registrable_domain(orgs: psl.OrgDomains, given: str | None,
                            expected: str | None) -> None:
    assert orgs.registrable_domain(given) == expected
