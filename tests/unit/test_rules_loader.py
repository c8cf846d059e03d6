"""Rule files -> rule sets: every mistake names file, line and key; local rules override shipped
ones by name; the check keeps the last good set on reload."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from trustmilter.checks import ALL
from trustmilter.checks import rules as rules_check
from trustmilter.config import load_config
from trustmilter.errors import ConfigError
from trustmilter.pipeline import Engine
from trustmilter.rules.loader import (RuleErrors, load_rule_set, rule_set_from_sources,
                                      shipped_rules_dir)
from trustmilter.types import Action

REPO_RULES = Path(__file__).resolve().parents[2] / "rules"

GOOD = """\
SPAMMY_SUBJECT:
  description: spammy subject
  score: 2.5
  match:
    header: {name: Subject, contains: viagra, nocase: true}
"""


def load(text: str, local: str | None = None) -> object:
    return rule_set_from_sources({"shipped.yaml": text}, {"local.yaml": local} if local else {})


def error_of(text: str, local: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, local)
    return info.value


@pytest.mark.parametrize("text,line,key,words", [
    # RE2 refuses back-references: at load, with the line of the pattern
    ("R1:\n  description: d\n  score: 1\n  match:\n    all:\n      - body: {contains: x}\n"
     "      - header: {name: Subject, regex: '(a)\\1'}\n",
     7, "R1.match.all[1].header.regex", "RE2 cannot compile"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    body:\n      regex: '(?<=a)b'\n",
     6, "R1.match.body.regex", "RE2 cannot compile"),
    ("R1:\n  description: d\n  score: 1\n  match: {body: {contains: x}}\n  colour: red\n",
     5, "R1.colour", "unknown key"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    bodyy: {contains: x}\n",
     5, "R1.match.bodyy", "unknown condition"),
    ("R1:\n  description: d\n  score: 1\n", 1, "R1", "missing 'match'"),
    ("R1:\n  description: d\n  match: {body: {contains: x}}\n", 1, "R1", "missing 'score'"),
    ("R1:\n  description: d\n  score: lots\n  match: {body: {contains: x}}\n", 3, "R1.score",
     "expected a number"),
    ("bad_name:\n  description: d\n  score: 1\n  match: {body: {contains: x}}\n", 1, "bad_name",
     "rule name"),
    ("R1:\n  description: d\n  score: 1\n  action: reject\n  match: {body: {contains: x}}\n",
     1, "R1.reason", "needs a 'reason'"),
    ("R1:\n  description: d\n  score: 1\n  action: reject\n  reason: \"Grüße\"\n"
     "  match: {body: {contains: x}}\n", 5, "R1.reason", "printable ASCII"),
    ("R1:\n  description: d\n  score: 1\n  action: delete\n  match: {body: {contains: x}}\n",
     4, "R1.action", "expected one of"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    body: {contains: x, part: attachment}\n",
     5, "R1.match.body.part", "expected one of"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    client_ip: [10.0.0.0/33]\n",
     5, "R1.match.client_ip", "not an IP network"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    auth: {spf: maybe}\n",
     5, "R1.match.auth.spf", "unknown result"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    message: {words: 3}\n",
     5, "R1.match.message.words", "unknown key"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    date: {future_hours: soon}\n",
     5, "R1.match.date.future_hours", "hours"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    header: {name: 'Sub ject', exists: true}\n",
     5, "R1.match.header.name", "not a header name"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    header: {name: Subject}\n",
     5, "R1.match.header", "expected regex, contains, equals or exists"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    body: {contains: x}\n    header: {name: X, exists: true}\n",
     4, "R1.match", "exactly one key"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    all: []\n",
     5, "R1.match.all", "non-empty list"),
    ("R1:\n  description: d\n  score: 1\n  match:\n    symbol: 'lower case'\n",
     5, "R1.match.symbol", "not a symbol name"),
])
def test_errors_name_file_line_and_key(text: str, line: int, key: str, words: str) -> None:
    err = error_of(text)
    assert err.file == "shipped.yaml"
    assert err.line == line, str(err)
    assert err.key == key, str(err)
    assert words in err.detail, str(err)
    assert str(err).startswith(f"shipped.yaml:{line}: key '{key}': ")


def test_yaml_syntax_error_names_the_line() -> None:
    err = error_of("R1:\n  description: d\n  score: [1\n  match: x\n")
    assert err.file == "shipped.yaml" and err.line is not None and "YAML syntax" in err.detail


def test_all_errors_are_reported_together() -> None:
    text = ("A1:\n  description: d\n  score: 1\n  match: {body: {regex: '(x'}}\n"
            "A2:\n  description: d\n  score: 1\n  match: {bogus: 1}\n")
    err = error_of(text)
    assert isinstance(err, RuleErrors)
    assert [(e.line, e.key) for e in err.errors] == [(4, "A1.match.body.regex"),
                                                     (8, "A2.match.bogus")]


def test_rule_loops_are_refused() -> None:
    text = ("A1:\n  description: d\n  score: 1\n  match: {symbol: B1}\n"
            "B1:\n  description: d\n  score: 1\n  match: {any: [{symbol: A1}, {body: {contains: x}}]}\n")
    err = error_of(text)
    assert "loop" in err.detail and "A1 -> B1 -> A1" in err.detail


def test_duplicate_names_across_files_of_one_layer() -> None:
    with pytest.raises(ConfigError) as info:
        rule_set_from_sources({"a.yaml": GOOD, "b.yaml": GOOD}, {})
    assert info.value.file == "b.yaml" and info.value.key == "SPAMMY_SUBJECT"
    assert "a.yaml:1" in info.value.detail


def test_duplicate_key_in_one_file_is_an_error() -> None:
    err = error_of(GOOD + GOOD)
    assert err.line == 6 and "duplicate" in err.detail


def test_limits_bound_patterns_and_depth() -> None:
    config = load_config(None, {"rules": {"limits": {"max_pattern_chars": 10, "max_depth": 2}}})
    long = "R1:\n  description: d\n  score: 1\n  match: {body: {contains: '12345678901'}}\n"
    with pytest.raises(ConfigError, match="max_pattern_chars"):
        rule_set_from_sources({"s.yaml": long}, {}, config)
    deep = ("R1:\n  description: d\n  score: 1\n  match: {not: {not: {not: {body: {contains: x}}}}}\n")
    with pytest.raises(ConfigError, match="max_depth"):
        rule_set_from_sources({"s.yaml": deep}, {}, config)


def test_a_pattern_needing_too_much_memory_is_refused() -> None:
    config = load_config(None, {"rules": {"limits": {"regex_max_mem": 65536}}})
    big = "R1:\n  description: d\n  score: 1\n  match: {body: {regex: '(?:[a-z]{20}\\d{30}){40}'}}\n"
    with pytest.raises(ConfigError, match="RE2 cannot compile"):
        rule_set_from_sources({"s.yaml": big}, {}, config)


def test_rule_may_not_reuse_a_check_symbol() -> None:
    text = "SPF_FAIL:\n  description: d\n  score: 1\n  match: {body: {contains: x}}\n"
    with pytest.raises(ConfigError, match="spf check already emits"):
        rule_set_from_sources({"s.yaml": text}, {}, load_config(None))


# --- local rules over shipped ones ---------------------------------------------------------------
def test_local_rule_replaces_shipped_rule_of_the_same_name() -> None:
    local = ("SPAMMY_SUBJECT:\n  description: local version\n  score: 4\n"
             "  match: {header: {name: Subject, contains: cialis}}\n")
    rs = load(GOOD, local)
    rule = rs.by_name["SPAMMY_SUBJECT"]
    assert (rule.description, rule.score, rule.file) == ("local version", 4.0, "local.yaml")


def test_local_entry_without_match_adjusts_the_shipped_rule() -> None:
    rs = load(GOOD, "SPAMMY_SUBJECT: {score: 0.5}\n")
    rule = rs.by_name["SPAMMY_SUBJECT"]
    assert rule.score == 0.5 and rule.description == "spammy subject"
    rs = load(GOOD, "SPAMMY_SUBJECT: {enabled: false}\n")
    assert "SPAMMY_SUBJECT" not in rs.by_name and rs.disabled[0].name == "SPAMMY_SUBJECT"
    rs = load(GOOD, "SPAMMY_SUBJECT: {action: junk}\n")
    assert rs.by_name["SPAMMY_SUBJECT"].action is Action.JUNK


def test_local_adjustment_of_an_unknown_rule_is_an_error() -> None:
    err = error_of(GOOD, "NO_SUCH_RULE: {score: 1}\n")
    assert err.file == "local.yaml" and err.line == 1
    assert "no shipped rule of that name" in err.detail


def test_config_scores_override_rule_scores() -> None:
    config = load_config(None, {"rules": {"scores": {"SPAMMY_SUBJECT": 9.0}}})
    rs = rule_set_from_sources({"s.yaml": GOOD}, {}, config)
    assert rs.by_name["SPAMMY_SUBJECT"].score == 9.0


def test_folders_are_read_in_name_order_and_local_dir_may_be_missing(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "b.yaml").write_text(GOOD)
    (shipped / "a.yml").write_text(GOOD.replace("SPAMMY_SUBJECT", "FIRST_RULE"))
    (shipped / "notes.txt").write_text("not rules")
    (shipped / "fixtures").mkdir()
    (shipped / "fixtures" / "x.yaml").write_text("not: rules")
    config = load_config(None, {"rules": {"shipped_dir": str(shipped),
                                          "local_dir": str(tmp_path / "missing")}})
    rs = load_rule_set(config)
    assert [r.name for r in rs.rules] == ["FIRST_RULE", "SPAMMY_SUBJECT"]
    assert rs.files == [str(shipped / "a.yml"), str(shipped / "b.yaml")]
    assert rs.sources[str(shipped / "b.yaml")] == GOOD


def test_shipped_rules_are_found_from_the_package() -> None:
    assert shipped_rules_dir(load_config(None)).resolve() == REPO_RULES.resolve()
    with pytest.raises(ConfigError) as info:
        shipped_rules_dir(load_config(None, {"rules": {"shipped_dir": "/nonexistent/rules"}}))
    assert info.value.key == "rules.shipped_dir"


def test_the_shipped_rule_set_loads() -> None:
    rs = load_rule_set(load_config(None), local=None)
    assert len(rs.rules) >= 40
    assert {"GTUBE_REJECT", "GTUBE_QUARANTINE", "GTUBE_JUNK"} <= set(rs.by_name)
    assert rs.by_name["GTUBE_REJECT"].action is Action.REJECT


# --- the check: setup, reload, dependencies -------------------------------------------------------
def test_rules_check_depends_on_every_other_check() -> None:
    others = {m.NAME for m in ALL if m.NAME != rules_check.NAME}
    assert set(rules_check.DEPENDS) == others
    assert ALL[-1] is rules_check


def _engine_with_local(make_engine: Callable[..., Engine], local: Path) -> Engine:
    return make_engine({"rules": {"local_dir": str(local)}})


def test_broken_rules_disable_the_check_loudly_and_reload_keeps_last_good(
        tmp_path: Path, make_engine: Callable[..., Engine]) -> None:
    local = tmp_path / "rules.d"
    local.mkdir()
    (local / "site.yaml").write_text(GOOD.replace("SPAMMY_SUBJECT", "SITE_RULE"))
    good = _engine_with_local(make_engine, local)
    assert "rules" not in good.disabled
    assert "SITE_RULE" in good.state[rules_check.STATE_KEY].by_name

    (local / "site.yaml").write_text(GOOD.replace("contains: viagra", "regex: '(a)\\1'"))
    broken = _engine_with_local(make_engine, local)
    assert "site.yaml:5" in broken.disabled["rules"]
    with pytest.raises(ConfigError):
        load_rule_set(broken.config)

    error = rules_check.keep_last_good(broken, good)
    assert error is not None and "RE2" in error
    assert "rules" not in broken.disabled
    assert broken.state[rules_check.STATE_KEY] is good.state[rules_check.STATE_KEY]
    # A healthy reload changes nothing.
    assert rules_check.keep_last_good(good, broken) is None


def test_rules_disabled_in_config_stay_disabled(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine({"rules": {"enabled": False}})
    assert engine.disabled["rules"] == "disabled in config"
    assert rules_check.keep_last_good(engine, engine) is None


# --- fixture files -----------------------------------------------------------------------------
def test_fixture_files_are_validated(tmp_path: Path) -> None:
    from trustmilter.rules.fixtures import load_fixtures
    path = tmp_path / "f.yaml"
    path.write_text("f1:\n  message: 'From: a@example.org\n\n    x'\n  config: {rules: {colour: red}}\n"
                    "  expect: {symbols: [X]}\n")
    with pytest.raises(ConfigError) as info:
        load_fixtures(path)
    assert (info.value.file, info.value.line, info.value.key) == (str(path), 5, "f1.config")
    assert "rules.colour" in info.value.detail
    path.write_text("f1:\n  message: 'x'\n  dns: [[example.org, A, not-an-address]]\n"
                    "  expect: {symbols: [X]}\n")
    with pytest.raises(ConfigError, match="bad record"):
        load_fixtures(path)
    path.write_text("f1:\n  message: |\n    From: Ann <ann@example.org>\n    To: b@example.net, "
                    "c@example.net\n\n    x\n  expect: {absent: [X]}\n")
    (fixture,) = load_fixtures(path)
    assert fixture.envelope.mail_from == "ann@example.org"
    assert fixture.envelope.rcpt_to == ("b@example.net", "c@example.net")
    assert fixture.envelope.client_ip is None
