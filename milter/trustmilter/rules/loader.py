"""YAML rule files -> a validated, compiled ``RuleSet``.

Two layers: the shipped rules (the repository's ``rules/``, or ``rules.shipped_dir``) and the
site's local rules (``rules.local_dir``, default /etc/trustmilter/rules.d). A local rule with the
name of a shipped one replaces it; a local entry without ``match`` only adjusts the shipped rule
of that name (``score``, ``enabled``, ``description``, ``action``, ``reason``).

Every mistake is a ``ConfigError`` naming file, line and key (``RuleErrors`` carries all of them,
so ``trustmilter rules check`` lists every problem at once). Regular expressions are compiled
with RE2 here; a pattern RE2 refuses (back-references, look-around) is an error at load, never
a surprise at run time.

For a reload, call ``load_rule_set(config)``: it raises instead of returning a partial set, so
the caller keeps the last good ``RuleSet`` (see ``checks.rules.install``).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import re2

from trustmilter.config import Config, load_yaml
from trustmilter.errors import ConfigError
from trustmilter.rules.engine import (BODY_PARTS, MESSAGE_FACTS_BOOL, MESSAGE_FACTS_NUM, All,
                                      Any_, Attachment_, Auth, Authenticated, AuthTest, Body,
                                      ClientIP, Condition, Date, EnvelopeText, From, FromTest,
                                      Header, LinkTest, Matcher, MessageFacts, Not, Range,
                                      RcptCount, ReplyTo, ReplyToTest, Rule, RuleSet, Symbol_,
                                      Url, walk)
from trustmilter.types import Action, AuthStatus

log = logging.getLogger("trustmilter.rules")

RULE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
RULE_KEYS = ("description", "score", "match", "action", "reason", "enabled")
PATCH_KEYS = frozenset(RULE_KEYS) - {"match"}
MAX_SCORE = 1000.0
MAX_REASON = 200
# The fixtures folder beside a rules folder is not rules.
FIXTURES_DIR = "fixtures"


@dataclass(frozen=True)
class Limits:
    """``rules.limits`` in config: bounds on what rule files may ask for."""

    max_rules: int = 2000
    max_file_bytes: int = 1048576
    max_pattern_chars: int = 4096
    regex_max_mem: int = 4194304
    max_depth: int = 12
    max_list_items: int = 5000

    @classmethod
    def from_config(cls, config: Config | None) -> "Limits":
        section = (config.get("rules.limits") if config is not None else None) or {}
        kwargs = {}
        for name in cls.__dataclass_fields__:
            if name in section:
                value = section[name]
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError("expected a positive integer", key=f"rules.limits.{name}")
                kwargs[name] = value
        return cls(**kwargs)


class RuleErrors(ConfigError):
    """Several rule problems; ``errors`` lists each (file, line, key), the message shows the
    first."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first.detail + more, file=first.file, line=first.line, key=first.key)
        self.errors = errors


# ---------------------------------------------------------------------------------------------
# Finding the rule files
# ---------------------------------------------------------------------------------------------
def _shipped_candidates() -> list[Path]:
    import trustmilter
    package = Path(trustmilter.__file__).resolve().parent
    return [
        package.parent.parent / "rules",                 # a source checkout / editable install
        Path(sys.prefix) / "share" / "trustmilter" / "rules",
        Path("/usr/share/trustmilter/rules"),
    ]


def shipped_rules_dir(config: Config | None) -> Path:
    """``rules.shipped_dir``, or (empty) the repository's rules/ found from the package."""
    configured = str((config.get("rules.shipped_dir") if config is not None else "") or "")
    if configured:
        path = Path(configured)
        if not path.is_dir():
            raise ConfigError(f"not a directory: {configured}", key="rules.shipped_dir")
        return path
    for candidate in _shipped_candidates():
        if candidate.is_dir():
            return candidate
    raise ConfigError("the shipped rules were not found (looked in "
                      + ", ".join(str(c) for c in _shipped_candidates())
                      + "); set rules.shipped_dir", key="rules.shipped_dir")


def local_rules_dir(config: Config | None) -> Path | None:
    configured = str((config.get("rules.local_dir") if config is not None else "") or "")
    return Path(configured) if configured else None


def rule_files(path: Path) -> list[Path]:
    """A rule file, or the *.yaml / *.yml files of a folder (not its subfolders), sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir()
                  if p.is_file() and p.suffix in (".yaml", ".yml") and not p.name.startswith("."))


def read_sources(path: Path | None, limits: Limits) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    out: dict[str, str] = {}
    for file in rule_files(path):
        try:
            size = file.stat().st_size
            if size > limits.max_file_bytes:
                raise ConfigError(f"file is {size} bytes; rules.limits.max_file_bytes is "
                                  f"{limits.max_file_bytes}", file=str(file))
            out[str(file)] = file.read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text: {exc.reason}", file=str(file)) from None
    return out


def load_rule_set(config: Config | None, local: Path | str | None = ...,  # type: ignore[assignment]
                  shipped: Path | str | None = ...) -> RuleSet:  # type: ignore[assignment]
    """The rule set config describes: shipped rules, then local rules over them by name.

    ``local``/``shipped`` replace the configured folders (``None`` = no such layer), which is
    how ``trustmilter rules check PATH`` checks a file before it is installed. Raises
    ConfigError (a ``RuleErrors`` when there are several problems) and never returns a partial
    set."""
    limits = Limits.from_config(config)
    shipped_path = shipped_rules_dir(config) if shipped is ... else (
        Path(shipped) if shipped is not None else None)
    local_path = local_rules_dir(config) if local is ... else (
        Path(local) if local is not None else None)
    if local_path is not None and local_path.exists() and not (
            local_path.is_dir() or local_path.is_file()):
        raise ConfigError("not a file or directory", file=str(local_path), key="rules.local_dir")
    if (shipped_path is not None and local_path is not None and local_path.exists()
            and local_path.resolve() == shipped_path.resolve()):
        local_path = None  # checking the shipped folder itself
    shipped_sources = read_sources(shipped_path, limits)
    local_sources = read_sources(local_path, limits)
    return rule_set_from_sources(shipped_sources, local_sources, config, limits)


def rule_set_from_sources(shipped: dict[str, str], local: dict[str, str],
                          config: Config | None = None, limits: Limits | None = None) -> RuleSet:
    """Build a rule set from file texts (path -> text), shipped layer then local layer."""
    limits = limits or Limits.from_config(config)
    errors: list[ConfigError] = []
    merged: dict[str, Rule] = {}
    shipped_rules = _parse_layer(shipped, limits, errors, base=None)
    merged.update(shipped_rules)
    local_rules = _parse_layer(local, limits, errors, base=shipped_rules)
    merged.update(local_rules)
    if len(merged) > limits.max_rules:
        errors.append(ConfigError(f"{len(merged)} rules; rules.limits.max_rules is "
                                  f"{limits.max_rules}", key="rules.limits.max_rules"))
    _check_names_against_config(merged, config, errors)
    _resolve_references(merged, errors)
    if errors:
        raise RuleErrors(errors)
    _apply_score_overrides(merged, config)
    ordered = list(merged.values())
    rule_set = RuleSet(rules=[r for r in ordered if r.enabled],
                       sources={**shipped, **local}, files=[*shipped, *local],
                       disabled=[r for r in ordered if not r.enabled],
                       regex_max_mem=limits.regex_max_mem)
    return rule_set


def _parse_layer(sources: dict[str, str], limits: Limits, errors: list[ConfigError],
                 base: dict[str, Rule] | None) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for path, text in sources.items():
        try:
            data = load_yaml(text, path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if data is None:
            continue
        if not isinstance(data, dict):
            errors.append(ConfigError("a rule file is a mapping of rule names to rules",
                                      file=path, line=1))
            continue
        lines = getattr(data, "lines", {})
        for name, body in data.items():
            line = lines.get(name)
            if name in rules:
                errors.append(ConfigError(f"rule defined twice (also at {rules[name].where})",
                                          file=path, line=line, key=name))
                continue
            try:
                rule = _parse_rule(name, body, path, line, limits,
                                   base.get(name) if base is not None else None, base is not None)
            except ConfigError as exc:
                errors.append(exc)
                continue
            rules[name] = rule
    return rules


# ---------------------------------------------------------------------------------------------
# One rule
# ---------------------------------------------------------------------------------------------
@dataclass
class _Where:
    file: str
    limits: Limits

    def error(self, message: str, line: int | None, key: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=line, key=key)


def _line(mapping: Any, key: str, default: int | None) -> int | None:
    return getattr(mapping, "lines", {}).get(key, default)


def _parse_rule(name: Any, body: Any, file: str, line: int | None, limits: Limits,
                shipped: Rule | None, is_local: bool) -> Rule:
    where = _Where(file, limits)
    if not isinstance(name, str) or not RULE_NAME.match(name):
        raise where.error("a rule name is a symbol: capital letters, digits and _, 1 to 64 "
                          "characters, starting with a letter", line, str(name))
    if not isinstance(body, dict):
        raise where.error("a rule is a mapping (description, score, match, ...)", line, name)
    for key in body:
        if key not in RULE_KEYS:
            raise where.error(f"unknown key (a rule has {', '.join(RULE_KEYS)})",
                              _line(body, key, line), f"{name}.{key}")
    if "match" not in body:
        if is_local and shipped is not None:
            return _patch(shipped, name, body, where, line)
        hint = " (and no shipped rule of that name to adjust)" if is_local else ""
        raise where.error(f"missing 'match'{hint}", line, name)
    for key in ("description", "score"):
        if key not in body:
            raise where.error(f"missing '{key}'", line, name)
    rule = Rule(name=name, description="", score=0.0, condition=All([]), file=file, line=line)
    _apply_fields(rule, body, where, line, name)
    rule.condition = _condition(body["match"], where, _line(body, "match", line),
                                f"{name}.match", depth=0)
    _check_action(rule, where, line, name)
    return rule


def _patch(shipped: Rule, name: str, body: dict[str, Any], where: _Where,
           line: int | None) -> Rule:
    rule = Rule(name=name, description=shipped.description, score=shipped.score,
                condition=shipped.condition, action=shipped.action, reason=shipped.reason,
                enabled=shipped.enabled, file=where.file, line=line)
    _apply_fields(rule, body, where, line, name)
    _check_action(rule, where, line, name)
    return rule


def _apply_fields(rule: Rule, body: dict[str, Any], where: _Where, line: int | None,
                  name: str) -> None:
    if "description" in body:
        value = body["description"]
        if not isinstance(value, str) or not value.strip():
            raise where.error("expected a non-empty string", _line(body, "description", line),
                              f"{name}.description")
        rule.description = " ".join(value.split())
    if "score" in body:
        value = body["score"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > MAX_SCORE:
            raise where.error(f"expected a number between -{MAX_SCORE:g} and {MAX_SCORE:g}",
                              _line(body, "score", line), f"{name}.score")
        rule.score = float(value)
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise where.error("expected true or false", _line(body, "enabled", line),
                              f"{name}.enabled")
        rule.enabled = body["enabled"]
    if "action" in body:
        value = body["action"]
        if value is None:
            rule.action = None
        else:
            try:
                rule.action = Action(value)
            except ValueError:
                raise where.error("expected one of " + ", ".join(a.value for a in Action),
                                  _line(body, "action", line), f"{name}.action") from None
    if "reason" in body:
        value = body["reason"]
        key_line = _line(body, "reason", line)
        if not isinstance(value, str):
            raise where.error("expected a string", key_line, f"{name}.reason")
        value = " ".join(value.split())
        # It becomes SMTP reply text: printable US-ASCII on one line, short enough to read.
        if not value or len(value) > MAX_REASON or not all(32 <= ord(c) < 127 for c in value):
            raise where.error(f"expected 1 to {MAX_REASON} printable ASCII characters (it is the "
                              "SMTP reply text)", key_line, f"{name}.reason")
        rule.reason = value


def _check_action(rule: Rule, where: _Where, line: int | None, name: str) -> None:
    if rule.action in (Action.REJECT, Action.TEMPFAIL) and not rule.reason:
        raise where.error("a reject or tempfail needs a 'reason' (the SMTP reply the sender "
                          "sees: short, saying what to change)", line, f"{name}.reason")


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------
_LEAVES: dict[str, Callable[[Any, _Where, int | None, str], Condition]] = {}


def _leaf(name: str) -> Callable[[Callable[[Any, _Where, int | None, str], Condition]],
                                 Callable[[Any, _Where, int | None, str], Condition]]:
    def register(fn: Callable[[Any, _Where, int | None, str], Condition]
                 ) -> Callable[[Any, _Where, int | None, str], Condition]:
        _LEAVES[name] = fn
        return fn
    return register


COMBINATORS = ("all", "any", "not")


def condition_keys() -> list[str]:
    return [*COMBINATORS, *sorted(_LEAVES)]


def _condition(node: Any, where: _Where, line: int | None, key: str, depth: int) -> Condition:
    if depth > where.limits.max_depth:
        raise where.error(f"nested deeper than rules.limits.max_depth ({where.limits.max_depth})",
                          line, key)
    if not isinstance(node, dict) or len(node) != 1:
        raise where.error("a condition is a mapping with exactly one key, one of: "
                          + ", ".join(condition_keys())
                          + " (combine several with all: [...])", line, key)
    (kind, value), = node.items()
    kline = _line(node, kind, line)
    kkey = f"{key}.{kind}"
    if kind in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise where.error("expected a non-empty list of conditions", kline, kkey)
        children = [_condition(item, where, _item_line(item, kline), f"{kkey}[{i}]", depth + 1)
                    for i, item in enumerate(value)]
        return All(children) if kind == "all" else Any_(children)
    if kind == "not":
        return Not(_condition(value, where, kline, kkey, depth + 1))
    builder = _LEAVES.get(kind)
    if builder is None:
        raise where.error("unknown condition; expected one of " + ", ".join(condition_keys()),
                          kline, kkey)
    return builder(value, where, kline, kkey)


def _item_line(item: Any, default: int | None) -> int | None:
    lines = getattr(item, "lines", None)
    if lines:
        return min(lines.values())
    return default


# --- value helpers ---------------------------------------------------------------------------
def _mapping(value: Any, allowed: Iterable[str], where: _Where, line: int | None,
             key: str) -> dict[str, Any]:
    allowed = tuple(allowed)
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping with some of: {', '.join(allowed)}", line, key)
    for k in value:
        if k not in allowed:
            raise where.error(f"unknown key; expected some of: {', '.join(allowed)}",
                              _line(value, k, line), f"{key}.{k}")
    return value


def _strings(value: Any, where: _Where, line: int | None, key: str,
             allow_empty_string: bool = False) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise where.error("expected a string or a non-empty list of strings", line, key)
    if len(items) > where.limits.max_list_items:
        raise where.error(f"{len(items)} items; rules.limits.max_list_items is "
                          f"{where.limits.max_list_items}", line, key)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise where.error("expected a string or a list of strings", line, key)
        text = str(item)
        if not text and not allow_empty_string:
            raise where.error("empty string", line, key)
        out.append(text)
    return out


def _bool(mapping: dict[str, Any], name: str, where: _Where, line: int | None,
          key: str) -> bool | None:
    if name not in mapping:
        return None
    value = mapping[name]
    if not isinstance(value, bool):
        raise where.error("expected true or false", _line(mapping, name, line), f"{key}.{name}")
    return value


def _count(mapping: dict[str, Any], name: str, where: _Where, line: int | None, key: str,
           default: int = 1) -> int:
    if name not in mapping:
        return default
    value = mapping[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise where.error("expected a whole number >= 1", _line(mapping, name, line),
                          f"{key}.{name}")
    return value


def _range(value: Any, where: _Where, line: int | None, key: str) -> Range:
    """``N`` (exactly N) or ``{min: A, max: B}`` (either may be left out)."""
    if isinstance(value, bool):
        raise where.error("expected a number or {min: N, max: N}", line, key)
    if isinstance(value, (int, float)):
        return Range(float(value), float(value))
    if not isinstance(value, dict):
        raise where.error("expected a number or {min: N, max: N}", line, key)
    mapping = _mapping(value, ("min", "max"), where, line, key)
    bounds = {}
    for bound in ("min", "max"):
        if bound in mapping:
            v = mapping[bound]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise where.error("expected a number", _line(mapping, bound, line),
                                  f"{key}.{bound}")
            bounds[bound] = float(v)
    if not bounds:
        raise where.error("expected min and/or max", line, key)
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        raise where.error("min is greater than max", line, key)
    return Range(bounds.get("min"), bounds.get("max"))


def _domains(value: Any, where: _Where, line: int | None, key: str) -> frozenset[str]:
    out = set()
    for item in _strings(value, where, line, key):
        domain = item.strip().strip(".").lower()
        try:
            domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
        except UnicodeError:
            raise where.error(f"not a domain: {item!r}", line, key) from None
        if not domain or " " in domain or "/" in domain or "@" in domain:
            raise where.error(f"not a domain: {item!r}", line, key)
        out.add(domain)
    return frozenset(out)


MATCH_KEYS = ("regex", "contains", "equals", "nocase", "min_count")


def _matcher(mapping: dict[str, Any], where: _Where, line: int | None, key: str,
             required: bool = True) -> Matcher | None:
    """The text test in a mapping: ``regex`` (RE2 syntax), ``contains``, ``equals`` (each a
    string or a list: any of them), ``nocase`` (default false), ``min_count`` (default 1)."""
    alternatives: list[str] = []
    shown: list[str] = []
    contained: list[bytes] = []
    for kind in ("regex", "contains", "equals"):
        if kind not in mapping:
            continue
        kline = _line(mapping, kind, line)
        for text in _strings(mapping[kind], where, kline, f"{key}.{kind}",
                             allow_empty_string=kind == "equals"):
            if len(text) > where.limits.max_pattern_chars:
                raise where.error(f"pattern of {len(text)} characters; "
                                  f"rules.limits.max_pattern_chars is "
                                  f"{where.limits.max_pattern_chars}", kline, f"{key}.{kind}")
            if kind == "regex":
                _compile(text, False, where, kline, f"{key}.{kind}")  # name the bad one
                alternatives.append(f"(?:{text})")
            elif kind == "contains":
                alternatives.append(re2.escape(text))
                contained.append(text.encode("utf-8"))
            else:
                alternatives.append(rf"\A(?:{re2.escape(text)})\z")
            shown.append(f"{kind} {text!r}")
    if not alternatives:
        if required:
            raise where.error("expected regex, contains or equals", line, key)
        return None
    nocase = _bool(mapping, "nocase", where, line, key) or False
    min_count = _count(mapping, "min_count", where, line, key)
    pattern = _compile("|".join(alternatives), nocase, where, line, key)
    # Only case-sensitive "contains" strings: plain byte search finds what the pattern finds.
    literals = tuple(contained) if len(contained) == len(alternatives) and not nocase else None
    return Matcher(pattern, min_count, "; ".join(shown), literals=literals)


def _compile(pattern: str, nocase: bool, where: _Where, line: int | None, key: str) -> Any:
    options = re2.Options()
    options.log_errors = False       # the error goes into our ConfigError, not stderr
    options.never_capture = True     # we only need whether and where it matched
    options.case_sensitive = not nocase
    options.max_mem = where.limits.regex_max_mem
    try:
        return re2.compile(pattern.encode("utf-8"), options)
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        raise where.error(f"RE2 cannot compile {pattern[:80]!r}: {detail} (RE2 has no "
                          "back-references or look-around)", line, key) from None


def _sub_matcher(mapping: dict[str, Any], name: str, where: _Where, line: int | None,
                 key: str) -> Matcher | None:
    if name not in mapping:
        return None
    nline = _line(mapping, name, line)
    spec = _mapping(mapping[name], ("regex", "contains", "equals", "nocase"), where, nline,
                    f"{key}.{name}")
    return _matcher(spec, where, nline, f"{key}.{name}")


# --- leaves ----------------------------------------------------------------------------------
@_leaf("header")
def _header(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("name", "exists", "raw", *MATCH_KEYS), where, line, key)
    if "name" not in spec:
        raise where.error("missing 'name' (a header name or a list of them)", line, key)
    names = _strings(spec["name"], where, _line(spec, "name", line), f"{key}.name")
    for n in names:
        if not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", n):
            raise where.error(f"not a header name: {n!r}", _line(spec, "name", line),
                              f"{key}.name")
    matcher = _matcher(spec, where, line, key, required=False)
    exists = _bool(spec, "exists", where, line, key)
    if matcher is None and exists is None:
        raise where.error("expected regex, contains, equals or exists", line, key)
    if matcher is not None and exists is not None:
        raise where.error("'exists' goes alone (a value test already needs the header)", line,
                          key)
    return Header(names, matcher, exists, _bool(spec, "raw", where, line, key) or False)


@_leaf("body")
def _body(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("part", *MATCH_KEYS), where, line, key)
    part = spec.get("part", "text")
    if part not in BODY_PARTS:
        raise where.error(f"expected one of {', '.join(BODY_PARTS)}", _line(spec, "part", line),
                          f"{key}.part")
    matcher = _matcher(spec, where, line, key)
    assert matcher is not None
    return Body(part, matcher)


_STATUSES = {s.value: s for s in AuthStatus}


def _statuses(mapping: dict[str, Any], name: str, where: _Where, line: int | None,
              key: str) -> frozenset[AuthStatus]:
    if name not in mapping:
        return frozenset()
    nline = _line(mapping, name, line)
    out = set()
    for item in _strings(mapping[name], where, nline, f"{key}.{name}"):
        status = _STATUSES.get(item.lower())
        if status is None:
            raise where.error(f"unknown result {item!r}; expected one of "
                              + ", ".join(_STATUSES), nline, f"{key}.{name}")
        out.add(status)
    return frozenset(out)


@_leaf("auth")
def _auth(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("spf", "dkim", "dmarc", "arc", "iprev", "dkim_domain",
                            "dmarc_policy", "dkim_aligned", "spf_aligned", "arc_trusted"),
                    where, line, key)
    if not spec:
        raise where.error("expected at least one of spf, dkim, dmarc, arc, iprev, ...", line,
                          key)
    policies = frozenset()
    if "dmarc_policy" in spec:
        pline = _line(spec, "dmarc_policy", line)
        policies = frozenset(p.lower() for p in _strings(spec["dmarc_policy"], where, pline,
                                                         f"{key}.dmarc_policy"))
        bad = policies - {"none", "quarantine", "reject"}
        if bad:
            raise where.error(f"unknown policy {sorted(bad)[0]!r}; expected none, quarantine, "
                              "reject", pline, f"{key}.dmarc_policy")
    test = AuthTest(
        spf=_statuses(spec, "spf", where, line, key),
        dkim=_statuses(spec, "dkim", where, line, key),
        dmarc=_statuses(spec, "dmarc", where, line, key),
        arc=_statuses(spec, "arc", where, line, key),
        iprev=_statuses(spec, "iprev", where, line, key),
        dkim_domains=_domains(spec["dkim_domain"], where, _line(spec, "dkim_domain", line),
                              f"{key}.dkim_domain") if "dkim_domain" in spec else frozenset(),
        dmarc_policy=policies,
        dkim_aligned=_bool(spec, "dkim_aligned", where, line, key),
        spf_aligned=_bool(spec, "spf_aligned", where, line, key),
        arc_trusted=_bool(spec, "arc_trusted", where, line, key),
    )
    return Auth(test)


@_leaf("symbol")
def _symbol(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    names, prefixes = set(), []
    for item in _strings(value, where, line, key):
        if item.endswith("*") and RULE_NAME.match(item[:-1] + "X"):
            prefixes.append(item[:-1])
        elif RULE_NAME.match(item):
            names.add(item)
        else:
            raise where.error(f"not a symbol name: {item!r} (NAME, or NAME_* for a prefix)",
                              line, key)
    return Symbol_(frozenset(names), tuple(prefixes))


@_leaf("url")
def _url(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("url", "host", "text", "domain", "not_domain", "scheme", "ip", "idn",
                            "userinfo",
                            "port", "text_mismatch", "lookalike", "in_html", "min_count"),
                    where, line, key)
    schemes = frozenset()
    if "scheme" in spec:
        schemes = frozenset(s.lower() for s in _strings(spec["scheme"], where,
                                                          _line(spec, "scheme", line),
                                                          f"{key}.scheme"))
    test = LinkTest(
        url=_sub_matcher(spec, "url", where, line, key),
        host=_sub_matcher(spec, "host", where, line, key),
        text=_sub_matcher(spec, "text", where, line, key),
        domains=_domains(spec["domain"], where, _line(spec, "domain", line), f"{key}.domain")
        if "domain" in spec else frozenset(),
        not_domains=_domains(spec["not_domain"], where, _line(spec, "not_domain", line),
                             f"{key}.not_domain") if "not_domain" in spec else frozenset(),
        schemes=schemes,
        ip=_bool(spec, "ip", where, line, key),
        idn=_bool(spec, "idn", where, line, key),
        userinfo=_bool(spec, "userinfo", where, line, key),
        port=_bool(spec, "port", where, line, key),
        text_mismatch=_bool(spec, "text_mismatch", where, line, key),
        lookalike=_bool(spec, "lookalike", where, line, key),
        in_html=_bool(spec, "in_html", where, line, key),
    )
    return Url(test, _count(spec, "min_count", where, line, key))


@_leaf("attachment")
def _attachment(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("name", "ext", "content_type", "size", "min_count"), where, line,
                    key)
    exts = frozenset()
    if "ext" in spec:
        exts = frozenset(e.lower().lstrip(".") for e in _strings(
            spec["ext"], where, _line(spec, "ext", line), f"{key}.ext"))
    types, prefixes = set(), []
    if "content_type" in spec:
        for item in _strings(spec["content_type"], where, _line(spec, "content_type", line),
                             f"{key}.content_type"):
            item = item.lower()
            if item.endswith("*"):
                prefixes.append(item[:-1])
            else:
                types.add(item)
    size = _range(spec["size"], where, _line(spec, "size", line), f"{key}.size") \
        if "size" in spec else None
    return Attachment_(_sub_matcher(spec, "name", where, line, key), exts, frozenset(types),
                       tuple(prefixes), size, _count(spec, "min_count", where, line, key))


@_leaf("client_ip")
def _client_ip(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    networks = []
    for item in _strings(value, where, line, key):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise where.error(f"not an IP network: {item!r}", line, key) from None
    return ClientIP(networks)


@_leaf("helo")
def _helo(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, MATCH_KEYS, where, line, key)
    matcher = _matcher(spec, where, line, key)
    assert matcher is not None
    return EnvelopeText("helo", matcher)


@_leaf("mail_from")
def _mail_from(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, MATCH_KEYS, where, line, key)
    matcher = _matcher(spec, where, line, key)
    assert matcher is not None
    return EnvelopeText("mail_from", matcher)


@_leaf("rcpt_count")
def _rcpt_count(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    return RcptCount(_range(value, where, line, key))


@_leaf("authenticated")
def _authenticated(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    if not isinstance(value, bool):
        raise where.error("expected true or false", line, key)
    return Authenticated(value)


@_leaf("from")
def _from(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("name", "address", "domain", "not_domain", "freemail",
                            "name_has_other_domain", "lookalike", "is_recipient"), where, line, key)
    if not spec:
        raise where.error("expected at least one test", line, key)
    return From(FromTest(
        name=_sub_matcher(spec, "name", where, line, key),
        address=_sub_matcher(spec, "address", where, line, key),
        domains=_domains(spec["domain"], where, _line(spec, "domain", line), f"{key}.domain")
        if "domain" in spec else frozenset(),
        not_domains=_domains(spec["not_domain"], where, _line(spec, "not_domain", line),
                             f"{key}.not_domain") if "not_domain" in spec else frozenset(),
        freemail=_bool(spec, "freemail", where, line, key),
        name_has_other_domain=_bool(spec, "name_has_other_domain", where, line, key),
        lookalike=_bool(spec, "lookalike", where, line, key),
        is_recipient=_bool(spec, "is_recipient", where, line, key),
    ))


@_leaf("reply_to")
def _reply_to(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("domain", "freemail", "differs_from_from"), where, line, key)
    if not spec:
        raise where.error("expected at least one test", line, key)
    return ReplyTo(ReplyToTest(
        domains=_domains(spec["domain"], where, _line(spec, "domain", line), f"{key}.domain")
        if "domain" in spec else frozenset(),
        freemail=_bool(spec, "freemail", where, line, key),
        differs_from_from=_bool(spec, "differs_from_from", where, line, key),
    ))


@_leaf("date")
def _date(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, ("missing", "invalid", "future_hours", "past_hours"), where, line, key)
    if len(spec) != 1:
        raise where.error("expected exactly one of missing, invalid, future_hours, past_hours",
                          line, key)
    (test, arg), = spec.items()
    aline = _line(spec, test, line)
    if test in ("missing", "invalid"):
        if arg is not True:
            raise where.error("expected true (use not: for the opposite)", aline, f"{key}.{test}")
        return Date(test)
    if isinstance(arg, bool) or not isinstance(arg, (int, float)) or arg < 0:
        raise where.error("expected a number of hours >= 0", aline, f"{key}.{test}")
    return Date(test, float(arg))


@_leaf("message")
def _message(value: Any, where: _Where, line: int | None, key: str) -> Condition:
    spec = _mapping(value, sorted(MESSAGE_FACTS_BOOL | MESSAGE_FACTS_NUM), where, line, key)
    if not spec:
        raise where.error("expected at least one fact", line, key)
    bools: dict[str, bool] = {}
    ranges: dict[str, Range] = {}
    for fact, arg in spec.items():
        fline = _line(spec, fact, line)
        if fact in MESSAGE_FACTS_BOOL:
            if not isinstance(arg, bool):
                raise where.error("expected true or false", fline, f"{key}.{fact}")
            bools[fact] = arg
        else:
            ranges[fact] = _range(arg, where, fline, f"{key}.{fact}")
    return MessageFacts(bools, ranges)


# ---------------------------------------------------------------------------------------------
# Whole-set checks
# ---------------------------------------------------------------------------------------------
def _check_names_against_config(rules: dict[str, Rule], config: Config | None,
                                errors: list[ConfigError]) -> None:
    """A rule may not reuse a symbol a check emits (its score would count twice)."""
    if config is None:
        return
    taken = {}
    for section_name, section in config.data.items():
        if section_name == "rules" or not isinstance(section, dict):
            continue
        for symbol in (section.get("scores") or {}):
            taken[symbol] = section_name
    for rule in rules.values():
        if rule.name in taken:
            errors.append(ConfigError(f"the {taken[rule.name]} check already emits this symbol; "
                                      "choose another rule name", file=rule.file, line=rule.line,
                                      key=rule.name))


def _resolve_references(rules: dict[str, Rule], errors: list[ConfigError]) -> None:
    names = frozenset(rules)
    for rule in rules.values():
        for cond in walk(rule.condition):
            if isinstance(cond, Symbol_):
                cond.resolve(names)
    # Rules naming rules must not loop (A needs B needs A would never settle).
    state: dict[str, int] = {}   # 1 = on the path, 2 = done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for ref in rules[name].condition.rule_refs():
            if state.get(ref) == 1:
                cycle = " -> ".join(path[path.index(ref):] + [ref]) if ref in path else ref
                rule = rules[name]
                errors.append(ConfigError(f"rules name each other in a loop: {cycle}",
                                          file=rule.file, line=rule.line, key=f"{name}.match"))
            elif state.get(ref) is None and ref in rules:
                visit(ref, path + [ref])
        state[name] = 2

    for name in rules:
        if state.get(name) is None:
            visit(name, [name])


def _apply_score_overrides(rules: dict[str, Rule], config: Config | None) -> None:
    """``rules.scores`` in config overrides a rule's score (tuning without editing rules)."""
    if config is None:
        return
    overrides = config.get("rules.scores") or {}
    for name, score in overrides.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ConfigError("expected a number", key=f"rules.scores.{name}")
        if name in rules:
            rules[name].score = float(score)
        elif name not in ("RULES_ERROR", "RULES_TIMEOUT"):   # the check's own symbols
            log.warning("rules.scores.%s names no rule; ignored", name)


def describe(rule_set: RuleSet) -> str:
    enabled = len(rule_set.rules)
    disabled = len(rule_set.disabled)
    return (f"{enabled} rules enabled, {disabled} disabled, from {len(rule_set.files)} files")


__all__ = ["Limits", "RuleErrors", "load_rule_set", "rule_set_from_sources", "shipped_rules_dir",
           "local_rules_dir", "rule_files", "describe", "condition_keys", "FIXTURES_DIR"]
