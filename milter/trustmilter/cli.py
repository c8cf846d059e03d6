"""The ``trustmilter`` command."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from trustmilter import __version__
from trustmilter.errors import TrustmilterError


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "resolver", None):
        out.setdefault("dns", {})["server"] = args.resolver
    return out


def cmd_scan(args: argparse.Namespace) -> int:
    from trustmilter.config import load_config
    from trustmilter.scan import EnvelopeOptions, format_human, format_json, scan_paths
    from trustmilter.sources import iter_messages

    overrides = _overrides(args)
    config = load_config(args.config, overrides)
    given = EnvelopeOptions(client_ip=args.client_ip, helo=args.helo, mail_from=args.mail_from,
                            rcpt=tuple(args.rcpt or ()))
    count = 0
    for rep in scan_paths(iter_messages(args.paths), config, args.config, overrides, given,
                          workers=args.workers):
        count += 1
        print(format_json(rep) if args.json else format_human(rep), flush=True)
        if not args.json:
            print()
    if count == 0:
        print("trustmilter scan: no messages found", file=sys.stderr)
        return 1
    return 0


# Modules that define more subcommands with register_cli(subparsers).
COMMAND_MODULES = (
    "trustmilter.server",        # serve
    "trustmilter.content.cli",   # train, learn, evaluate, models
    "trustmilter.rules.cli",     # rules check, rules test
    "trustmilter.state_cli",     # reputation, history, quarantine
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustmilter",
                                     description="Inbound mail trust and spam filter.")
    parser.add_argument("--version", action="version", version=f"trustmilter {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="run the pipeline on saved mail and print verdicts")
    scan.add_argument("paths", nargs="+", metavar="PATH",
                      help="message file, directory, mbox or Maildir")
    scan.add_argument("--config", help="local config file (YAML) over the shipped defaults")
    scan.add_argument("--client-ip", help="SMTP client address (default: from Received headers)")
    scan.add_argument("--helo", help="HELO/EHLO name (default: from Received headers)")
    scan.add_argument("--mail-from", help="envelope sender (default: Return-Path, else From)")
    scan.add_argument("--rcpt", action="append", help="envelope recipient (repeatable)")
    scan.add_argument("--resolver", metavar="HOST[:PORT]", help="DNS resolver to use")
    scan.add_argument("--json", action="store_true", help="one JSON object per message and line")
    scan.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: config scan.workers, 0 = one per core)")
    scan.set_defaults(func=cmd_scan)

    # Other commands live beside what they drive; each module adds its own subcommands.
    import importlib
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="trustmilter: %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TrustmilterError as exc:
        print(f"trustmilter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
