from trustmilter.message import ParsedMessage
from trustmilter.received import first_untrusted_hop, parse_networks, parse_received


def test_parse_common_received_forms() -> None:
    hop = parse_received("from mail.example.org (mail.example.org [192.0.2.10]) by mx.test "
                         "(Postfix) with ESMTP id X")
    assert (hop.helo, hop.ip) == ("mail.example.org", "192.0.2.10")
    hop = parse_received("from [192.0.2.5] (helo=foo) by mx with esmtp")
    assert hop.ip == "192.0.2.5"
    hop = parse_received("from host (unknown [IPv6:2001:db8::25]) by mx.test")
    assert hop.ip == "2001:db8::25"
    hop = parse_received("by mx.test with local")
    assert hop.ip is None and hop.helo is None


def test_first_untrusted_skips_our_relays() -> None:
    raw = (b"Received: from relay.ours (relay.ours [10.1.1.1]) by mx.ours\n"
           b"Received: from sender.example (sender.example [198.51.100.4]) by relay.ours\n"
           b"Received: from inner (inner [203.0.113.9]) by sender.example\n"
           b"\n")
    msg = ParsedMessage.parse(raw)
    hop = first_untrusted_hop(msg, parse_networks(["10.0.0.0/8"]))
    assert hop is not None and (hop.ip, hop.helo) == ("198.51.100.4", "sender.example")
    assert first_untrusted_hop(msg, parse_networks([])).ip == "10.1.1.1"  # type: ignore[union-attr]
