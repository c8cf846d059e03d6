"""``trustmilter scan``: run ``evaluate`` on saved mail, in worker processes when there is more
than one message, and report each verdict for people or (``--json``) for scripts."""
from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator

from trustmilter.config import Config, load_config
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import Engine, evaluate
from trustmilter.received import first_untrusted_hop
from trustmilter.types import Envelope, Verdict


@dataclass(frozen=True)
class EnvelopeOptions:
    """What the user said on the command line; None = infer from the message."""

    client_ip: str | None = None
    helo: str | None = None
    mail_from: str | None = None
    rcpt: tuple[str, ...] = ()


def infer_envelope(msg: ParsedMessage, given: EnvelopeOptions, engine: Engine) -> Envelope:
    """Fill what the user did not give from the message, and say what was assumed."""
    assumed: list[str] = []
    client_ip, helo = given.client_ip, given.helo
    if client_ip is None or helo is None:
        hop = first_untrusted_hop(msg, engine.trusted_networks + engine.trusted_relays)
        if hop is not None:
            if client_ip is None:
                client_ip = hop.ip
                assumed.append(f"client IP {hop.ip} from the first untrusted Received header")
            if helo is None and hop.helo:
                helo = hop.helo
                assumed.append(f"HELO {hop.helo} from the same Received header")
        elif client_ip is None:
            assumed.append("client IP unknown (no untrusted Received header): IP checks skipped")
    mail_from = given.mail_from
    if mail_from is None:
        return_path = msg.get("Return-Path")
        if return_path is not None:
            mail_from = return_path.strip().strip("<>").strip()
            assumed.append(f"MAIL FROM <{mail_from}> from Return-Path")
        else:
            froms = msg.from_addresses
            mail_from = froms[0] if froms else ""
            assumed.append(f"MAIL FROM <{mail_from}> from the From header (no Return-Path)")
    rcpt = given.rcpt
    if not rcpt:
        delivered = msg.get_all("Delivered-To")
        if delivered:
            rcpt = tuple(delivered[:1])
            assumed.append(f"RCPT TO <{rcpt[0]}> from Delivered-To")
    return Envelope(client_ip=client_ip, helo=helo, mail_from=mail_from, rcpt_to=rcpt,
                    assumptions=tuple(assumed))


def scan_one(label: str, raw: bytes, given: EnvelopeOptions, engine: Engine) -> dict[str, Any]:
    message = ParsedMessage.parse(raw)
    verdict = evaluate(infer_envelope(message, given, engine), raw, engine, message)
    return report(label, verdict)


def report(label: str, verdict: Verdict) -> dict[str, Any]:
    out = {"file": label}
    out.update(verdict.as_dict())
    out["assumptions"] = list(verdict.assumptions)
    return out


# ---- worker processes -------------------------------------------------------------------------
_worker_engine: Engine | None = None
_worker_given: EnvelopeOptions | None = None


def _init_worker(config_path: str | None, overrides: dict[str, Any],
                 given: EnvelopeOptions) -> None:
    global _worker_engine, _worker_given
    _worker_engine = Engine.from_config(load_config(config_path, overrides))
    _worker_given = given


def _scan_in_worker(item: tuple[str, bytes]) -> dict[str, Any]:
    assert _worker_engine is not None and _worker_given is not None
    return scan_one(item[0], item[1], _worker_given, _worker_engine)


# The heavy libraries the workers' engines load (the model's scikit-learn and skops, ~1 s of CPU):
# imported once here, before the pool forks its workers, so that they inherit them instead of
# each importing its own copy.
_WORKER_PRELOAD = ("trustmilter.content.registry", "sklearn.linear_model", "skops.io")


def _preload_for_workers() -> None:
    for name in _WORKER_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass   # the worker's engine reports it (the check is disabled loudly there)


def scan_paths(messages: Iterator[tuple[str, bytes]], config: Config, config_path: str | None,
               overrides: dict[str, Any], given: EnvelopeOptions,
               workers: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield one report per message, in input order."""
    workers = workers or int(config.section("scan")["workers"]) or os.cpu_count() or 1
    first = list(_take(messages, 2))
    if workers == 1 or len(first) < 2:
        engine = Engine.from_config(config)
        for label, raw in first:
            yield scan_one(label, raw, given, engine)
        for label, raw in messages:
            yield scan_one(label, raw, given, engine)
        return
    _preload_for_workers()
    with cf.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                initargs=(config_path, overrides, given)) as pool:
        yield from pool.map(_scan_in_worker, _chain(first, messages), chunksize=8)


def _take(it: Iterator[tuple[str, bytes]], n: int) -> Iterator[tuple[str, bytes]]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def _chain(first: list[tuple[str, bytes]], rest: Iterator[tuple[str, bytes]]
           ) -> Iterator[tuple[str, bytes]]:
    yield from first
    yield from rest


def format_human(rep: dict[str, Any]) -> str:
    lines = [f"== {rep['file']}",
             f"action: {rep['action']}   score: {rep['score']:g}   ({rep['elapsed_ms']:.1f} ms)"]
    if rep.get("reason"):
        lines.append(f"reason: {rep['reason']}")
    lines.append(f"Authentication-Results: {rep['authentication_results']}")
    if rep["symbols"]:
        width = max(len(s["name"]) for s in rep["symbols"])
        lines.append("symbols:")
        for s in rep["symbols"]:
            lines.append(f"  {s['name']:<{width}}  {s['score']:>6.2f}  {s['reason']}")
    for note in rep.get("assumptions", []):
        lines.append(f"assumed: {note}")
    return "\n".join(lines)


def format_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, ensure_ascii=False, separators=(",", ":"))


__all__ = ["EnvelopeOptions", "infer_envelope", "scan_one", "scan_paths", "format_human",
           "format_json", "replace"]
