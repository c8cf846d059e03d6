"""The load test (tests/load/loadrun.py) scaled down for CI: 2,000 generated messages from 100
concurrent SMTP sessions through a real Postfix and ``trustmilter serve``, twice against the same
milter. Every message must be accounted for (delivered once with our Authentication-Results and
no forged one, held, or refused with a 5xx; 4xx retried until one of those) and match its verdict
in the milter's history; memory must stay flat from run 1 to run 2. No corpus (CI has none).

The full run, with its figures: ``.venv/bin/python tests/load/loadrun.py --messages 20000
--sessions 100`` (README, "Load").
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import loadrun  # noqa: E402  (puts tests/, tests/integration on the path)
from load_account import Copy, reconcile  # noqa: E402
from postfix import postfix_available  # noqa: E402

CI_MESSAGES = 2000
CI_SESSIONS = 100
CI_RUNS = 2

_why_not = postfix_available()


@pytest.mark.postfix
@pytest.mark.skipif(_why_not is not None, reason=_why_not or "")
def test_load_every_message_accounted_for_and_memory_flat() -> None:
    t0 = time.monotonic()
    report = loadrun.run_load(loadrun.Options(messages=CI_MESSAGES, sessions=CI_SESSIONS,
                                              runs=CI_RUNS, corpus=False))
    print(loadrun.format_report(report))
    print(f"load test: {time.monotonic() - t0:.0f} s")
    assert len(report["runs"]) == CI_RUNS, report["failures"]
    for run in report["runs"]:
        acc = run["accounting"]
        assert acc["sent"] == CI_MESSAGES
        assert acc["lost"] == 0, acc["lost_messages"]
        assert acc["problem_count"] == 0, acc["problems"]
        assert acc["accounted"] == CI_MESSAGES
        # Every path was taken, so the accounting proved something about each: deliveries
        # (inbox and junk), holds, 5xx refusals, and 4xx answers the client retried.
        assert acc["actions"].get("inbox", 0) > 0 and acc["actions"].get("junk", 0) > 0
        assert acc["fates"].get("held", 0) > 0 and acc["fates"].get("rejected", 0) > 0
        assert acc["replies_4xx"] > 0 and acc["tempfail_verdicts"] > 0
        assert run["milter_log_lines"] >= CI_MESSAGES
    assert report["leak"] is not None and report["leak"]["ok"], report["leak"]
    assert report["ok"], report["failures"]


# ---- the accounting itself: it must name what is missing -----------------------------------------
def _result(msgid: str, final: str, code: int, queue_id: str = "",
            earlier: tuple[int, ...] = ()) -> dict[str, object]:
    attempts = [{"t": 0.0, "code": c, "reply": f"{c} 4.7.1 try later", "ms": 1.0}
                for c in earlier]
    attempts.append({"t": 1.0, "code": code, "reply": f"{code} reply", "ms": 1.0})
    return {"msgid": msgid, "category": "", "size": 100, "attempts": attempts, "final": final,
            "queue_id": queue_id}


def _verdict(msgid: str, action: str, queue_id: str = "") -> dict[str, object]:
    return {"message_id": msgid, "action": action, "queue_id": queue_id}


def test_reconcile_names_lost_messages_and_every_mismatch() -> None:
    planned = {"<inbox@t>": "dkim_rsa2048", "<held@t>": "gtube_quarantine",
               "<refused@t>": "dmarc_reject", "<vanished@t>": "no_auth",
               "<unsent@t>": "spf_fail", "<twice@t>": "no_auth", "<wrong@t>": "gtube_reject",
               "<retried@t>": "tempfail_once"}
    results = [_result("<inbox@t>", "accepted", 250, "Q1"),
               _result("<held@t>", "accepted", 250, "Q2"),
               _result("<refused@t>", "rejected", 550),
               _result("<vanished@t>", "accepted", 250, "Q4"),
               _result("<twice@t>", "accepted", 250, "Q6"),
               _result("<wrong@t>", "accepted", 250, "Q7"),
               _result("<retried@t>", "accepted", 250, "Q8", earlier=(451,))]
    good = Copy("new/1", our_authres=1, other_authres=0, forged_seen=False, spam_flag="")
    copies = {"<inbox@t>": [good], "<twice@t>": [good, good], "<wrong@t>": [good],
              "<retried@t>": [good]}
    held = {"<held@t>": ["Q2"]}
    history = [_verdict("<inbox@t>", "inbox", "Q1"), _verdict("<held@t>", "quarantine", "Q2"),
               _verdict("<refused@t>", "reject"), _verdict("<vanished@t>", "inbox", "Q4"),
               _verdict("<twice@t>", "inbox", "Q6"), _verdict("<wrong@t>", "inbox", "Q7"),
               _verdict("<retried@t>", "tempfail", "Q0"), _verdict("<retried@t>", "inbox", "Q8")]
    acc = reconcile(planned, results, copies, held, history)
    assert acc.sent == 8 and acc.accounted == 6
    assert dict(acc.fates) == {"delivered": 4, "held": 1, "rejected": 1}
    assert sorted(line.split(":")[0] for line in acc.lost) == ["<unsent@t>", "<vanished@t>"]
    assert any("<twice@t>: 2 delivered copies" in p for p in acc.problems), acc.problems
    assert any("<wrong@t>: gtube_reject got inbox" in p for p in acc.problems), acc.problems
    assert len(acc.problems) == 2, acc.problems
    assert acc.replies_4xx == 1 and acc.tempfail_verdicts == 1 and acc.retried_messages == 1

    # The milter's record must match what happened to the message.
    history[0] = _verdict("<inbox@t>", "quarantine", "Q1")
    acc = reconcile(planned, results, copies, held, history)
    assert any("<inbox@t>: history says quarantine, the message was delivered" in p
               for p in acc.problems), acc.problems
    # A forged header that survived, a missing verdict, our header missing.
    copies["<inbox@t>"] = [Copy("new/9", our_authres=0, other_authres=0, forged_seen=True,
                                spam_flag="")]
    acc = reconcile(planned, results, copies, held, history[1:])
    text = "\n".join(acc.problems)
    assert "<inbox@t>: 0 final verdicts" in text
    assert "<inbox@t>: forged Authentication-Results survived" in text
    assert "<inbox@t>: 0 Authentication-Results claiming mx.test.example" in text
