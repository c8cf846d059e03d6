"""trustmilter.psl: organizational domains from the Public Suffix List (both sections), loaded
once per engine, from the package's list or from dmarc.psl_file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import TESTSUITES
from trustmilter import psl
from trustmilter.errors import ConfigError
from trustmilter.pipeline import Engine

PINNED = TESTSUITES / "psl" / "public_suffix_list.dat"


@pytest.fixture(scope="module")
def builtin() -> psl.OrgDomains:
    return psl.OrgDomains.load()


def test_builtin_list_has_both_sections(builtin: psl.OrgDomains) -> None:
    assert builtin.has_private_section
    assert builtin.rules > 5000
    assert builtin.public_suffix("www.example.co.uk") == "co.uk"          # ICANN
    assert builtin.public_suffix("foo.yoni.za.org") == "za.org"           # private section
    assert builtin.organizational_domain("foo.yoni.za.org") == "yoni.za.org"
    assert builtin.organizational_domain("alice.github.io") == "alice.github.io"


@pytest.mark.parametrize(("name", "org"), [
    ("example.com", "example.com"),
    ("a.b.Example.COM", "example.com"),
    ("mail.example.com.", "example.com"),          # trailing dot: the same name
    ("example.co.uk", "example.co.uk"),
    ("deep.sub.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),                            # a public suffix is its own org domain
    ("com", "com"),
    ("foo.bar.unknowntld", "bar.unknowntld"),      # unlisted TLD: the implicit "*" rule
    ("localhost", "localhost"),
    ("xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),
    ("www.食狮.公司.cn", "食狮.公司.cn"),            # Unicode in, Unicode out
])
def test_organizational_domain(builtin: psl.OrgDomains, name: str, org: str) -> None:
    assert builtin.organizational_domain(name) == org


@pytest.mark.parametrize("name", [None, "", ".", ".example.com", "a..example.com", "com"])
def test_no_registrable_domain(builtin: psl.OrgDomains, name: str | None) -> None:
    assert builtin.registrable_domain(name) is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "list.dat"
    path.write_text(text, "utf-8")
    return path


def test_psl_file_replaces_the_builtin_list(make_engine: Callable[..., Engine],
                                            tmp_path: Path) -> None:
    # A tiny list where example.com itself is a suffix: the org domain moves one label down.
    path = _write(tmp_path, "// ===BEGIN ICANN DOMAINS===\ncom\n// ===END ICANN DOMAINS===\n"
                            "// ===BEGIN PRIVATE DOMAINS===\nexample.com\n")
    engine = make_engine({"dmarc": {"psl_file": str(path)}})
    orgs = psl.for_engine(engine)
    assert orgs.source == str(path) and orgs.rules == 2
    assert orgs.organizational_domain("a.b.example.com") == "b.example.com"
    assert orgs.organizational_domain("a.example.org") == "example.org"


def test_loaded_once_per_engine(make_engine: Callable[..., Engine],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Any] = []
    real = psl.OrgDomains.load.__func__  # type: ignore[attr-defined]

    def counting(cls: type[psl.OrgDomains], path: str | None = None) -> psl.OrgDomains:
        loads.append(path)
        return real(cls, path)

    monkeypatch.setattr(psl.OrgDomains, "load", classmethod(counting))
    engine = make_engine({"dmarc": {"psl_file": str(PINNED)}})
    assert len(loads) == 1                         # dmarc.setup loaded it
    first = psl.for_engine(engine)
    for _ in range(5):
        assert psl.for_engine(engine) is first
    assert len(loads) == 1


@pytest.mark.parametrize("content", [None, "// only comments\n\n"])
def test_bad_psl_file_disables_dmarc_loudly(make_engine: Callable[..., Engine], tmp_path: Path,
                                            content: str | None) -> None:
    path = tmp_path / "missing.dat" if content is None else _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        psl.OrgDomains.load(str(path))
    assert info.value.key == "dmarc.psl_file" and str(path) in str(info.value)
    engine = make_engine({"dmarc": {"psl_file": str(path)}})
    assert "dmarc" in engine.disabled and "Public Suffix List" in engine.disabled["dmarc"]
