"""How the Bayes store looks tokens up in SQLite (one JSON array parameter, an IN list when the
JSON would need a \\u escape): a token is found iff it is in the table, whatever its text."""
from __future__ import annotations

from pathlib import Path

from trustmilter.store.sqlite import SQLiteTokenStore

TRICKY = ['a"b', "a\\b", "a\\u0041", "x\ny", "tab\there", "nul\x00x", "c\x01d", "emoji\U0001F600",
          "\u00fcber", "\u4e2d\u6587", "e\u0301", "123", "1e5", "true", "null", "", " ", "\u2028",
          "\x7f", "z" * 3000, "[", "]", "'", "\ufeff", "\U0010ffff"]


def test_any_token_text_is_looked_up_exactly(tmp_path: Path) -> None:
    """Tokens go to SQLite as one JSON array; whatever escaping that needs, a token is found iff
    it is in the table (json_each cuts a string at \\u0000: "nul\\u0000x" would find "nul")."""
    store = SQLiteTokenStore(tmp_path / "bayes.sqlite", snapshot_after=0)
    store.learn([("m1", TRICKY, "spam"), ("m2", TRICKY[::2], "ham")])
    asked = TRICKY + ["nul", "nul\x00", 'a"', "A", "x\n", "emoji", "\\u0041", "c\x01"]
    conn = store._conn()
    want = {}
    for token in asked:
        row = conn.execute("SELECT spam, ham FROM tokens WHERE token = ?", (token,)).fetchone()
        if row is not None:
            want[token] = tuple(row)
    assert len(want) == len(TRICKY)
    assert store.counts(asked) == want
    for token in asked:
        assert store.counts([token]) == {t: c for t, c in want.items() if t == token}
    assert store.counts(asked[::-1] * 2) == want                      # order and repeats
    assert store._local.json_each                                     # the JSON way was taken
