"""``trustmilter reputation | history | quarantine``: the admin's view of the state databases."""
from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from typing import Any

from trustmilter.config import Config, load_config
from trustmilter.errors import TrustmilterError


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, sort_keys=True), flush=True)


# ---- reputation ---------------------------------------------------------------------------------
def _reputation(args: argparse.Namespace, readonly: bool) -> Any:
    from trustmilter.store.reputation import ReputationStore
    config = _config(args)
    store = ReputationStore.from_config(config, readonly=readonly)
    if readonly and not store.db.exists():
        raise TrustmilterError(f"{store.path}: no reputation recorded yet")
    return store


def cmd_reputation_show(args: argparse.Namespace) -> int:
    from trustmilter.store.reputation import expand_key
    store = _reputation(args, readonly=True)
    keys = expand_key(args.key)
    if len(keys) == 1 and keys[0].startswith("ip:"):
        from trustmilter.store.reputation import ip_keys
        keys = ip_keys(keys[0][3:])
    found = store.lookup(keys)
    now = store.clock()
    if args.json:
        for key in keys:
            if key in found:
                st = found[key]
                j = store.policy.judge(st, now)
                _print_json({**st.as_dict(), "good": j.good, "bad": j.bad})
        return 0 if found else 1
    if not found:
        print(f"no history for {', '.join(keys)}")
        return 1
    print(f"{'KEY':<40} {'HAM':>7} {'JUNK':>7} {'QUAR':>7} {'REJECT':>7} {'MSGS':>6} {'CORR':>5}  "
          f"{'FIRST SEEN':<19}  {'LAST SEEN':<19}  JUDGEMENT")
    for key in keys:
        st = found.get(key)
        if st is None:
            continue
        j = store.policy.judge(st, now)
        verdict = "bad" if j.bad else "good" if j.good else "-"
        print(f"{_short(key, 40):<40} {st.ham:>7.2f} {st.junk:>7.2f} {st.quarantine:>7.2f} "
              f"{st.reject:>7.2f} {st.messages:>6} {st.corrections:>5}  {_when(st.first_seen):<19}  "
              f"{_when(st.last_seen):<19}  {verdict}")
    return 0


def cmd_reputation_top(args: argparse.Namespace) -> int:
    store = _reputation(args, readonly=True)
    rows = store.top(order=args.order, kind=args.kind, limit=args.limit)
    if args.json:
        for st in rows:
            _print_json(st.as_dict())
        return 0
    print(f"{'KEY':<44} {'HAM':>8} {'SPAM':>8} {'MSGS':>7}  LAST SEEN")
    for st in rows:
        print(f"{_short(st.key, 44):<44} {st.ham:>8.2f} {st.spam:>8.2f} {st.messages:>7}  "
              f"{_when(st.last_seen)}")
    return 0


def cmd_reputation_forget(args: argparse.Namespace) -> int:
    from trustmilter.store.reputation import expand_key
    store = _reputation(args, readonly=False)
    keys = [k for text in args.keys for k in expand_key(text)]
    removed = store.forget(keys)
    print(f"forgot {removed} key(s): {', '.join(keys)}")
    return 0 if removed else 1


# ---- history ------------------------------------------------------------------------------------
def cmd_history(args: argparse.Namespace) -> int:
    from trustmilter.store.history import HistoryStore, parse_since
    config = _config(args)
    store = HistoryStore.from_config(config, readonly=True)
    if not store.db.exists():
        raise TrustmilterError(f"{store.path}: no history recorded yet")
    try:
        since = parse_since(args.since) if args.since else None
        until = parse_since(args.until) if args.until else None
    except ValueError as exc:
        raise TrustmilterError(str(exc)) from None
    entries = store.query(since=since, until=until, actions=args.action or (),
                          queue_id=args.queue_id, limit=args.limit)
    if args.json:
        for e in entries:
            _print_json(e.as_dict())
        return 0
    for e in entries:
        action = e.action if e.intended in ("", e.action) else f"{e.action}(shadow:{e.intended})"
        symbols = ",".join(f"{n}({s:g})" for n, s in e.symbols if s) or "-"
        ids = " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}"
                       for k, v in sorted(e.identities.items()))
        print(f"{_when(e.time)} {e.queue_id or '-':<12} {action:<10} {e.score:>7.2f} "
              f"ip={e.client_ip or '-'} from=<{e.mail_from}> rcpt={len(e.rcpt)} {ids} "
              f"symbols={symbols} ms={e.elapsed_ms:g}")
    return 0


# ---- quarantine ---------------------------------------------------------------------------------
def _quarantine(args: argparse.Namespace, readonly: bool, must_exist: bool = True) -> tuple[Any, Any]:
    from trustmilter.store.quarantine import PostfixQueue, QuarantineIndex
    config = _config(args)
    index = QuarantineIndex.from_config(config, readonly=readonly)
    if readonly and must_exist and not index.db.exists():
        raise TrustmilterError(f"{index.path}: nothing quarantined yet")
    return index, PostfixQueue.from_config(config)


def _actor() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    # With --mta the hold queue is listed even before anything was indexed (a lost index).
    index, mta = _quarantine(args, readonly=True, must_exist=not args.mta)
    have_index = index.db.exists()
    entries = index.entries(status=None if args.all else "held", limit=args.limit) if have_index else []
    held: dict[str, Any] | None = mta.held() if args.mta else None
    if args.json:
        for e in entries:
            row = e.as_dict()
            if held is not None:
                row["in_hold_queue"] = e.queue_id in held
            _print_json(row)
        if held is not None:
            known = {e.queue_id for e in entries}
            for qid, item in held.items():
                if qid not in known and (not have_index or index.get(qid) is None):
                    _print_json({"queue_id": qid, "status": "unindexed", "sender": item.get("sender"),
                                 "time": item.get("arrival_time")})
        return 0
    print(f"{'QUEUE ID':<14} {'HELD AT':<19} {'SCORE':>6} {'STATUS':<9} {'SENDER':<30} "
          f"{'RCPT':<26} SUBJECT")
    for e in entries:
        status = e.status
        if held is not None and e.status == "held" and e.queue_id not in held:
            status = "gone"      # no longer in the hold queue: released or deleted elsewhere
        rcpt = e.recipients[0] if e.recipients else "-"
        if len(e.recipients) > 1:
            rcpt += f" +{len(e.recipients) - 1}"
        print(f"{e.queue_id or '-':<14} {_when(e.time):<19} {e.score:>6.2f} {status:<9} "
              f"{_short('<' + e.sender + '>', 30):<30} {_short(rcpt, 26):<26} {_short(e.subject, 60)}")
    if held is not None:
        known = {e.queue_id for e in entries}
        for qid, item in held.items():
            if qid not in known and (not have_index or index.get(qid) is None):
                print(f"{qid:<14} {_when(item.get('arrival_time')):<19} {'':>6} {'unindexed':<9} "
                      f"{_short('<' + str(item.get('sender', '')) + '>', 30):<30}")
    return 0


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    from trustmilter.store.quarantine import check_queue_id
    index, _mta = _quarantine(args, readonly=True)
    entry = index.get(check_queue_id(args.queue_id))
    if entry is None:
        print(f"{args.queue_id}: not in the quarantine index", file=sys.stderr)
        return 1
    if args.json:
        _print_json(entry.as_dict())
        return 0
    print(f"Queue ID:   {entry.queue_id}")
    print(f"Held at:    {_when(entry.time)}")
    print(f"Status:     {entry.status}" + (f" ({_when(entry.status_time)} by {entry.status_by})"
                                            if entry.status_time else ""))
    print(f"Client:     {entry.client_ip or '-'}")
    print(f"Sender:     <{entry.sender}>")
    print(f"Recipients: {', '.join('<' + r + '>' for r in entry.recipients) or '-'}")
    print(f"Subject:    {entry.subject}")
    print(f"Message-ID: {entry.message_id or '-'}")
    print(f"Score:      {entry.score:g}")
    print(f"Reason:     {entry.reason}")
    print("Symbols:    " + ", ".join(f"{n}({s:g})" for n, s in entry.symbols))
    return 0


def _act(args: argparse.Namespace, what: str) -> int:
    from trustmilter.store import quarantine as q
    index, mta = _quarantine(args, readonly=False)
    failed = 0
    for queue_id in args.queue_ids:
        try:
            entry = (q.release if what == "release" else q.delete)(index, mta, queue_id, _actor())
        except q.QuarantineError as exc:
            print(f"{queue_id}: {exc}", file=sys.stderr)
            failed += 1
            continue
        done = "released" if what == "release" else "deleted"
        extra = f" ({entry.reason})" if entry.id is None else ""
        print(f"{entry.queue_id}: {done}{extra}")
    return 1 if failed else 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    return _act(args, "release")


def cmd_quarantine_delete(args: argparse.Namespace) -> int:
    return _act(args, "delete")


# ---- registration -------------------------------------------------------------------------------
def register_cli(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="local config file (YAML) over the shipped defaults")

    rep = subparsers.add_parser("reputation", help="show, rank or forget sender reputation")
    rep_sub = rep.add_subparsers(dest="reputation_command", required=True)
    p = rep_sub.add_parser("show", parents=[common],
                           help="history of a key: dkim:/spf:/dmarc:/org:DOMAIN, a domain (all "
                                "its kinds), an IPv4 address (and its /24), an IPv6 address "
                                "(its /64) or a network")
    p.add_argument("key")
    p.add_argument("--json", action="store_true", help="one JSON object per key and line")
    p.set_defaults(func=cmd_reputation_show)
    p = rep_sub.add_parser("top", parents=[common], help="keys with the most spam (or ham) verdicts")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--bad", dest="order", action="store_const", const="bad",
                       help="most junk/quarantine/reject verdicts (default)")
    order.add_argument("--good", dest="order", action="store_const", const="good",
                       help="most ham verdicts")
    order.add_argument("--volume", dest="order", action="store_const", const="volume",
                       help="most verdicts of any kind")
    p.add_argument("--kind", choices=["dkim", "spf", "dmarc", "org", "ip", "net"],
                   help="only keys of this kind")
    p.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reputation_top, order="bad")
    p = rep_sub.add_parser("forget", parents=[common],
                           help="delete a key's history (a domain: all its kinds)")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.set_defaults(func=cmd_reputation_forget)

    hist = subparsers.add_parser("history", parents=[common], help="verdicts the milter acted on")
    hist.add_argument("--since", help="from: 30m, 1h, 2d, 1w ago or a date/time (2026-11-01, "
                                      "2026-11-01T10:00)")
    hist.add_argument("--until", help="to (same forms as --since)")
    hist.add_argument("--action", action="append",
                      choices=["inbox", "junk", "quarantine", "reject", "tempfail"],
                      help="only this action (repeatable)")
    hist.add_argument("--queue-id", help="only this queue id")
    hist.add_argument("-n", "--limit", type=int, default=200,
                      help="at most this many, the newest (default 200)")
    hist.add_argument("--json", action="store_true", help="one JSON object per verdict and line")
    hist.set_defaults(func=cmd_history)

    quar = subparsers.add_parser("quarantine", help="held messages: list, show, release, delete")
    quar_sub = quar.add_subparsers(dest="quarantine_command", required=True)
    p = quar_sub.add_parser("list", parents=[common], help="messages held by trustmilter")
    p.add_argument("--all", action="store_true", help="released and deleted ones too")
    p.add_argument("--mta", action="store_true",
                   help="compare with the MTA's hold queue (postqueue -j): entries no longer "
                        "held show as gone, held messages missing from the index as unindexed")
    p.add_argument("-n", "--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quarantine_list)
    p = quar_sub.add_parser("show", parents=[common], help="one held message's index entry")
    p.add_argument("queue_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quarantine_show)
    p = quar_sub.add_parser("release", parents=[common],
                            help="deliver held message(s) (postsuper -H)")
    p.add_argument("queue_ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_quarantine_release)
    p = quar_sub.add_parser("delete", parents=[common],
                            help="delete held message(s) from the hold queue (postsuper -d ID hold)")
    p.add_argument("queue_ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_quarantine_delete)
