"""The side-by-side benchmark's arithmetic for interleaved milter rounds: one engine's rounds add
up to one result (counts and times summed, latency percentiles over every message, the peak
memory), with each round's own rates kept."""
from __future__ import annotations

from pathlib import Path

from tests.bench.side_by_side import _combined, _csv_latencies


def _round(number: int, messages: int, wall: float, cpu: float, latencies: list[float],
           rss: float) -> dict[str, object]:
    return {"round": number, "messages": messages, "wall_s": wall, "cpu_s": cpu,
            "dns_queries": 10, "load_1m_at_start": 1.5,
            "outcomes": {"ham:250": messages - 1, "spam:550": 1},
            "memory": {"peak_rss_mb": rss, "peak_pss_mb": rss / 2, "processes": 6,
                       "samples": 30},
            "system_cpu_busy_pct": 90.0 + number, "latencies_s": latencies,
            "command": "smtp_send.py --repeat 1"}


def test_rounds_combine_into_one_result() -> None:
    parts = [_round(1, 100, 0.5, 0.6, [0.01] * 99 + [0.5], 800.0),
             _round(2, 100, 0.4, 0.5, [0.02] * 100, 850.0)]
    result = _combined(parts, "unix:/x.sock")
    assert result["messages"] == 200 and result["wall_s"] == 0.9
    assert result["msgs_per_s"] == round(200 / 0.9, 1)
    assert result["cpu_s"] == 1.1 and result["msgs_per_cpu_s"] == round(200 / 1.1, 1)
    # Over all 200 messages: the median is round 2's 20 ms, the 99th percentile still 20 ms
    # (one slow message in 200), not either round's own figure.
    assert result["latency_p50_ms"] == 20.0 and result["latency_p99_ms"] == 20.0
    assert result["outcomes"] == {"ham:250": 198, "spam:550": 2}
    assert result["smtp_codes"] == {"250": 198, "550": 2} and result["tempfails"] == 0
    assert result["memory"]["peak_rss_mb"] == 850.0 and result["dns_queries"] == 20
    assert [r["msgs_per_s"] for r in result["rounds"]] == [200.0, 250.0]
    assert all("latencies_s" not in r for r in result["rounds"])
    assert result["command"] == "smtp_send.py --repeat 1"


def test_latencies_come_from_smtp_sends_csv(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("path,label,smtp_code,smtp_msg,latency_s\n/a,ham,250,ok,0.012\n"
                    "/b,spam,451,tempfail,0.5\n/c,ham,,,\n")
    assert _csv_latencies(path) == [0.012, 0.5]
