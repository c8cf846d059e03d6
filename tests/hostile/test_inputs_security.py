"""Hostile input and service security checked in process (fast): every charset Python knows and
some it does not, a pathological regular expression in a rule (RE2 runs linear), YAML with
Python tags in rule files, and a pickled model (never unpickled)."""
from __future__ import annotations

import base64
import pickle
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostile import messages  # noqa: E402

from trustmilter.content.features import Limits, decode_bytes, extract  # noqa: E402
from trustmilter.errors import ConfigError  # noqa: E402
from trustmilter.message import ParsedMessage, decode_words  # noqa: E402
from trustmilter.rules.engine import Evaluation  # noqa: E402
from trustmilter.rules.loader import rule_set_from_sources  # noqa: E402
from trustmilter.types import Envelope  # noqa: E402

PAYLOAD = b"caf\xe9 \x80\x81\xfe\xff \x1b$B\x1b(B +AGEAYgBj- \x00 end"


@pytest.mark.parametrize("charset", messages.all_charsets())
def test_every_charset_decodes_or_degrades(charset: str) -> None:
    """Text codecs decode (with replacement), bytes-to-bytes codecs (base64, zlib, rot13...)
    and unknown names fall back: always a str, never an exception."""
    assert isinstance(decode_bytes(PAYLOAD, charset), str)
    encoded = base64.b64encode(PAYLOAD).decode()
    assert isinstance(decode_words(f"=?{charset}?B?{encoded}?= x"), str)
    assert isinstance(decode_words(f"=?{charset}?Q?caf=E9=00?="), str)


def test_one_message_with_every_charset() -> None:
    raw = messages.charset_message(messages.all_charsets())
    limits = Limits(max_bytes=len(raw) + 1, max_text_chars=10**7, max_parts=10_000)
    features = extract(ParsedMessage.parse(raw), limits)
    assert len(features.part_types) == len(messages.all_charsets())
    # ASCII-compatible charsets keep "end" readable (EBCDIC and UTF-16/32 turn it to other text).
    assert features.text_plain.count("end") >= len(messages.all_charsets()) // 2


# ---- a pathological regular expression ---------------------------------------------------------
REDOS = """\
REDOS_BODY:
  description: exponential for a backtracking engine
  score: 1
  match:
    body: {regex: '(a+)+$'}
REDOS_HEADER:
  description: the same in a header
  score: 1
  match:
    header: {name: Subject, regex: '^(a|a?)+b$'}
"""


def _hits(raw: bytes) -> list[str]:
    rules = rule_set_from_sources({}, {"local/redos.yaml": REDOS})
    msg = ParsedMessage.parse(raw)
    ev = Evaluation(rules, msg, Envelope(client_ip="192.0.2.1", helo="h.test", mail_from="",
                                         rcpt_to=()), {}, lambda: extract(msg))
    return [h.rule.name for h in rules.evaluate(ev)]


def test_pathological_regex_runs_linear() -> None:
    """Python's re needs about 2**n steps for (a+)+$ on n a's and a '!': n = 30 is already
    minutes. RE2 is linear: 100,000 a's in the Subject and 50,000 in the body (the decoded text
    rules see is bounded by content.max_text_chars, 60,000) take milliseconds."""
    raw = b"Subject: " + b"a" * 100_000 + b"!\r\n\r\n" + b"a" * 50_000 + b"!"
    started = time.perf_counter()
    assert _hits(raw) == []
    assert time.perf_counter() - started < 3.0
    # And the rules do match what they should (they were not refused or skipped).
    assert _hits(b"Subject: aaab\r\n\r\n" + b"a" * 1000) == ["REDOS_BODY", "REDOS_HEADER"]


def test_regex_re2_cannot_run_is_refused_at_load() -> None:
    """What RE2 cannot run in linear time (backreferences, lookaround) is refused with the file
    and rule named, never silently compiled with a backtracking engine."""
    bad = REDOS.replace("'(a+)+$'", "'(a+)\\1$'")
    with pytest.raises(ConfigError, match="redos.yaml"):
        rule_set_from_sources({}, {"local/redos.yaml": bad})


# ---- YAML and models loaded safely ---------------------------------------------------------------
@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']",
                                 "!!python/name:os.system",
                                 "!!python/object/new:subprocess.Popen [['touch', '{marker}']]"])
def test_rule_files_refuse_python_tags(tag: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = REDOS.replace("description: the same in a header",
                         "description: " + tag.format(marker=marker))
    with pytest.raises(ConfigError):
        rule_set_from_sources({}, {"local/evil.yaml": text})
    assert not marker.exists()


def test_config_refuses_python_tags_everywhere(tmp_path: Path) -> None:
    """tests/unit/test_config.py covers a tag at the top level; here one hides in a nested
    section and one in a list, and nothing runs."""
    from trustmilter.config import load_config
    marker = tmp_path / "pwned"
    for text in (f"dns:\n  server: !!python/object/apply:os.system ['touch {marker}']\n",
                 f"trusted_networks:\n  - !!python/object/apply:os.system ['touch {marker}']\n"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError):
            load_config(str(path))
    assert not marker.exists()


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(Path("/tmp") / "trustmilter-pickle-ran"), "w"))


def test_a_pickled_model_is_never_unpickled(tmp_path: Path) -> None:
    """A pickle in place of the model file, with a card whose digest matches it: refused as
    not a skops archive, and the pickle's payload never runs."""
    from trustmilter.content.model import (CARD_FILE, MODEL_FILE, ModelError, load_model,
                                           sha256_file, write_card)
    from trustmilter.content.registry import SHIPPED_MODELS, current_model_path
    import json
    shipped = current_model_path(SHIPPED_MODELS)
    assert shipped is not None
    target = tmp_path / "m"
    shutil.copytree(shipped, target)
    marker = Path("/tmp") / "trustmilter-pickle-ran"
    marker.unlink(missing_ok=True)
    (target / MODEL_FILE).write_bytes(pickle.dumps({"format": 1, "classifier": _Boom()}))
    card = json.loads((target / CARD_FILE).read_text())
    card["files"][MODEL_FILE]["sha256"] = sha256_file(target / MODEL_FILE)
    write_card(target, card)
    with pytest.raises(ModelError):
        load_model(target)
    assert not marker.exists()
