"""ARC chain validation vectors from testsuites/arc: the ValiMail validation suite (171 tests) and
8 real-world chains (robur-coop/ocaml-arc), one pytest id per case.

Each case runs ``trustmilter.checks.arc`` (the pipeline's code path: our DNS client, a message
DNS session) with the suite's key records served by the real test DNS server. Runner rules
(testsuites/arc/README.md): TXT values are served as given (split into 255-byte strings); the
chain status is compared case-insensitively with ``cv``; an empty ``cv`` (the newest seal already
says cv=fail, RFC 8617 5.2 step 2) means fail. Real-world chains: compare the chain result and
each set's validity (``valid``/``broken``: whether that set's ARC-Seal verifies; older AMSs may
legitimately break, RFC 8617 5.2 only requires the newest one).
"""
from __future__ import annotations

import csv
import re
from typing import Any, Callable

import pytest
import yaml

from tests.conftest import TESTSUITES
from tests.keys import run_check
from trustmilter import authresults
from trustmilter.checks import arc as arc_check
from trustmilter.checks.base import CheckContext
from trustmilter.dns import session_for
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import Engine
from trustmilter.types import Envelope

pytestmark = pytest.mark.conformance

ARC_DIR = TESTSUITES / "arc"
VALIMAIL = ARC_DIR / "arc-draft-validation-tests.yml"
REALWORLD = ARC_DIR / "realworld-ocaml-arc"

# Cases where we differ from the suite (strict xfail, with the reason). None today.
DISAGREEMENTS: dict[str, str] = {}


def _missing(path: Any, what: str) -> list[Any]:
    return [pytest.param(None, id=f"{what}-suite-missing", marks=pytest.mark.skip(
        reason=f"{what} not found at {path} (set TRUSTMILTER_SHARED or provide "
               "../shared/testsuites)"))]


def _marks(case_id: str) -> list[Any]:
    if case_id in DISAGREEMENTS:
        return [pytest.mark.xfail(reason=DISAGREEMENTS[case_id], strict=True,
                                  raises=AssertionError)]
    return []


def _validate(engine: Engine, raw: bytes) -> arc_check.ChainValidation:
    ctx = CheckContext(envelope=Envelope(client_ip="192.0.2.1"), message=ParsedMessage.parse(raw),
                       dns=session_for(engine.resolver,
                                       float(engine.config.section("dns")["deadline"])),
                       config=engine.config, engine=engine)
    return arc_check.validate(ctx)


# ----- ValiMail arc_test_suite ------------------------------------------------------------------

def _valimail_cases() -> list[Any]:
    if not VALIMAIL.is_file():
        return _missing(VALIMAIL, "ValiMail ARC suite")
    cases = []
    with VALIMAIL.open("rb") as fh:
        for scenario in yaml.safe_load_all(fh):
            records = scenario.get("txt-records") or {}
            for test_id, test in scenario["tests"].items():
                case_id = f"valimail:{test_id}"
                cases.append(pytest.param((records, test), id=case_id, marks=_marks(case_id)))
    return cases


@pytest.mark.parametrize("case", _valimail_cases())
def test_valimail_validation(case: Any, dns_server: Any,
                             make_engine: Callable[..., Engine]) -> None:
    records, test = case
    for name, value in records.items():
        dns_server.add(name, "TXT", str(value))
    raw = str(test["message"]).encode("utf-8")
    expected = (test["cv"] or "fail").strip().lower()     # README: empty cv = fail
    result = run_check(arc_check, make_engine(), raw)
    assert result.outcome.status.value == expected, result.outcome.reason
    authresults.parse(authresults.build("mx.test.example", result.authres))


def test_valimail_suite_is_complete() -> None:
    if not VALIMAIL.is_file():
        pytest.skip(f"ValiMail ARC suite not found at {VALIMAIL}")
    assert len([c for c in _valimail_cases()]) == 171


# ----- real-world chains ------------------------------------------------------------------------

def _realworld_cases() -> list[Any]:
    if not REALWORLD.is_dir():
        return _missing(REALWORLD, "real-world ARC chains")
    cases = []
    with (REALWORLD / "expected.tsv").open(encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0].startswith("#"):
                continue
            filename, per_set, chain = row[0], row[1], row[2]
            sets = {int(i): (state, domain) for i, state, domain in
                    re.findall(r"i=(\d+):(valid|broken)\(([^)]+)\)", per_set)}
            case_id = f"realworld:{filename}"
            cases.append(pytest.param((filename, sets, chain), id=case_id, marks=_marks(case_id)))
    return cases


@pytest.mark.parametrize("case", _realworld_cases())
def test_realworld_chains(case: Any, dns_server: Any, make_engine: Callable[..., Engine]) -> None:
    filename, sets, chain = case
    for name, value in yaml.safe_load((REALWORLD / "dns.yaml").read_text())["txt"].items():
        dns_server.add(name, "TXT", str(value))
    raw = (REALWORLD / filename).read_bytes()
    validation = _validate(make_engine(), raw)
    assert validation.outcome.status.value == chain, validation.outcome.reason
    assert validation.outcome.instance == max(sets)
    assert validation.outcome.sealer == sets[max(sets)][1]
    got = {s.instance: ("valid" if s.as_valid else "broken", s.as_domain) for s in validation.sets}
    assert got == sets
