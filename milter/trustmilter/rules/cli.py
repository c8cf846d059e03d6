"""``trustmilter rules check [PATH]`` and ``trustmilter rules test [PATH]``.

Without PATH both work on the configured rule set: the shipped rules plus ``rules.local_dir``.
With PATH (a rule file or a folder of them) the shipped rules plus PATH are used, so a file can
be checked before it is installed; PATH may also be the shipped folder itself. ``rules test``
runs the fixtures in ``fixtures/`` beside the rules (or the fixture file or folder PATH names).
Exit status: 0 all good, 1 a problem (each printed as file:line: key: message).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trustmilter.errors import ConfigError


def register_cli(subparsers: Any) -> None:
    rules = subparsers.add_parser("rules", help="check YAML rules and run their fixtures")
    sub = rules.add_subparsers(dest="rules_command", required=True)

    check = sub.add_parser("check", help="validate rule files (exit 0 ok, 1 errors)")
    check.add_argument("path", nargs="?", metavar="PATH",
                       help="a rule file or folder to check over the shipped rules "
                            "(default: the configured rules)")
    check.add_argument("--config", help="local config file (YAML) over the shipped defaults")
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="run rule fixtures through the pipeline "
                                       "(exit 0 all pass, 1 a failure)")
    test.add_argument("path", nargs="?", metavar="PATH",
                      help="a rules folder (its fixtures/ are run), a fixtures folder or a "
                           "fixture file (default: the fixtures of the configured rules)")
    test.add_argument("--config", help="local config file (YAML) over the shipped defaults")
    test.add_argument("--json", action="store_true", help="one JSON object")
    test.add_argument("--strict", action="store_true",
                      help="also fail when a rule has no fixture that expects it")
    test.add_argument("--all-checks", action="store_true",
                      help="keep the site-state checks (bayes, reputation) on")
    test.add_argument("-k", dest="select", metavar="TEXT",
                      help="run only fixtures whose name contains TEXT")
    test.set_defaults(func=cmd_test)


def _error_dict(err: ConfigError) -> dict[str, Any]:
    return {"file": err.file, "line": err.line, "key": err.key, "message": err.detail}


def _errors(exc: ConfigError) -> list[ConfigError]:
    return list(getattr(exc, "errors", None) or [exc])


def _load(config_path: str | None, path: str | None) -> tuple[Any, Any, list[Path]]:
    """(config, rule set, the rule folders it came from)."""
    from trustmilter.config import load_config
    from trustmilter.rules.loader import load_rule_set, local_rules_dir, shipped_rules_dir

    config = load_config(config_path)
    shipped = shipped_rules_dir(config)
    if path is None:
        local = local_rules_dir(config)
        rule_set = load_rule_set(config)
    else:
        local = Path(path)
        if not local.exists():
            raise ConfigError("no such file or directory", file=path)
        rule_set = load_rule_set(config, local=local)
    dirs = [shipped]
    if local is not None and local.exists():
        dirs.append(local if local.is_dir() else local.parent)
    return config, rule_set, dirs


def cmd_check(args: argparse.Namespace) -> int:
    from trustmilter.rules.loader import describe
    try:
        _config, rule_set, _dirs = _load(args.config, args.path)
    except ConfigError as exc:
        errors = _errors(exc)
        if args.json:
            print(json.dumps({"ok": False, "errors": [_error_dict(e) for e in errors]}))
        else:
            for err in errors:
                print(f"{err}")
            print(f"trustmilter rules check: {len(errors)} error(s)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "rules": len(rule_set.rules),
                          "disabled": len(rule_set.disabled), "files": rule_set.files,
                          "errors": []}))
    else:
        print(f"ok: {describe(rule_set)}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from trustmilter.rules.fixtures import (fixtures_dir, load_fixtures, run_fixtures,
                                            uncovered_rules)
    try:
        fixture_paths: list[Path]
        rules_path: str | None = None
        if args.path is None:
            _config, rule_set, dirs = _load(args.config, None)
            fixture_paths = [fixtures_dir(d) for d in dirs]
        else:
            path = Path(args.path)
            if not path.exists():
                raise ConfigError("no such file or directory", file=args.path)
            if path.is_dir() and fixtures_dir(path).is_dir():
                rules_path = str(path)     # a rules folder: its rules and its fixtures
                fixture_paths = [fixtures_dir(path)]
            else:
                fixture_paths = [path]     # fixtures only, against the configured rules
            _config, rule_set, dirs = _load(args.config, rules_path)
            if rules_path is not None:
                dirs = [Path(rules_path)]
            else:
                dirs = []
        fixtures = [f for p in fixture_paths if p.exists() for f in load_fixtures(p)]
        if args.select:
            fixtures = [f for f in fixtures if args.select in f.name]
        results = run_fixtures(fixtures, args.config, rule_set, all_checks=args.all_checks)
    except ConfigError as exc:
        errors = _errors(exc)
        if args.json:
            print(json.dumps({"ok": False, "errors": [_error_dict(e) for e in errors]}))
        else:
            for err in errors:
                print(f"{err}")
        return 1
    uncovered = uncovered_rules(rule_set, fixtures, dirs) if not args.select else []
    passed = sum(1 for r in results if r.passed)
    failed = len(results) - passed
    ok = failed == 0 and bool(results) and not (args.strict and uncovered)
    if args.json:
        print(json.dumps({"ok": ok, "passed": passed, "failed": failed, "uncovered": uncovered,
                          "fixtures": [r.as_dict() for r in results]}))
    else:
        for r in results:
            status = "PASS" if r.passed else "FAIL"
            print(f"{status} {r.fixture.name}  ({r.fixture.where})  action={r.action} "
                  f"score={r.score:g}")
            for problem in r.problems:
                print(f"     {problem}")
            if not r.passed:
                print(f"     symbols: {', '.join(r.symbols) or 'none'}")
        if uncovered:
            print(f"rules without a fixture that expects them: {', '.join(uncovered)}")
        if not results:
            print("no fixtures found")
        print(f"fixtures: {passed} passed, {failed} failed")
    return 0 if ok else 1
