"""Run the atheris fuzz target (tests/fuzz/fuzz_message.py) for a bounded, seeded number of
iterations in a subprocess, from a corpus of the hostile messages and the scan fixtures. A crash
(any exception escaping the parser or the feature extractor) fails the test and names the input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostile import messages  # noqa: E402

pytest.importorskip("atheris")

TARGET = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_message.py"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "scan"
MAX_LEN = 8192
RUNS = 4_000           # about 8 s here; max_total_time caps a slow machine


def test_fuzz_message_parser_bounded(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, make in messages.CASES.items():
        (corpus / name).write_bytes(make()[:MAX_LEN])
    (corpus / "dmarc").write_bytes(b"DMARC-Test: v=DMARC1; p=reject; pct=50; rua=mailto:a@b!10m"
                                   b"\r\nFrom: a@b.test\r\n\r\nbody\r\n")
    for path in sorted(FIXTURES.glob("*"))[:20]:
        if path.is_file():
            (corpus / f"fixture-{path.name}").write_bytes(path.read_bytes()[:MAX_LEN])
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = subprocess.run(
        [sys.executable, str(TARGET), f"-runs={RUNS}", "-seed=1", "-max_total_time=10",
         f"-max_len={MAX_LEN}", "-timeout=10", "-rss_limit_mb=2048",
         f"-artifact_prefix={artifacts}/", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    crashes = sorted(artifacts.iterdir())
    detail = proc.stderr[-4000:]
    assert proc.returncode == 0 and not crashes, (
        f"fuzzer failed ({proc.returncode}); inputs: "
        f"{[(c.name, c.read_bytes()[:300]) for c in crashes]}\n{detail}")
    assert "Done" in proc.stderr, detail
