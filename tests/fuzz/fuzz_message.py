"""Coverage-guided fuzz target (atheris/libFuzzer) for the message parser and content features.

Any exception escaping ``one_input`` is a bug: the parser and feature extraction promise never to
raise on hostile input. Run it by hand for as long as you like:

    .venv/bin/python tests/fuzz/fuzz_message.py -max_total_time=600 corpus_dir/

tests/hostile/test_fuzz.py runs it for a bounded number of iterations in CI, seeded with the
hostile messages of tests/hostile/messages.py.
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["trustmilter"]):
    from trustmilter.checks import dmarc
    from trustmilter.content.features import Limits, extract
    from trustmilter.content.tokenize import tokenize
    from trustmilter.message import ParsedMessage, decode_words

# Small limits: the fuzzer's inputs are small, and the limits' own code paths get exercised.
LIMITS = Limits(max_bytes=8192, max_text_chars=4000, max_parts=16)


def one_input(data: bytes) -> None:
    msg = ParsedMessage.parse(data)
    assert msg.body == data[msg.body_offset:]
    for header in msg.headers:
        _ = header.value
    _ = msg.from_addresses, msg.from_domains, msg.subject
    decode_words(data[:300].decode("utf-8", "surrogateescape"))
    features = extract(msg, LIMITS)
    # The budget bounds the decoded text; parts are joined with one newline each.
    assert len(features.text_plain) <= LIMITS.max_text_chars + LIMITS.max_parts
    tokenize(features)
    for value in msg.get_all("DMARC-Test")[:2]:   # a header the seeds carry: record parser too
        try:
            dmarc.parse_record(value, strict=False)
        except dmarc.DMARCRecordError:
            pass


def main(argv: list[str]) -> None:
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
