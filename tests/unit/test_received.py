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


def test_by_clause_ends_the_from_clause_whatever_its_case_and_space() -> None:
    hop = parse_received("from a.example (a.example [192.0.2.1])\tBY\tb.example ([192.0.2.2])")
    assert hop.ip == "192.0.2.1"
    hop = parse_received("from a.example (helo) BY b.example (b.example [192.0.2.2])")
    assert hop.ip is None and hop.helo == "a.example"      # b's address is not the sender's


def test_addresses_come_back_canonical_and_invalid_ones_are_skipped() -> None:
    hop = parse_received("from h ([IPv6:2001:DB8:0::0:1]) by mx")
    assert hop.ip == "2001:db8::1"
    hop = parse_received("from h (h [300.1.1.1]) (h2 [192.0.2.7]) by mx")
    assert hop.ip == "192.0.2.7"
    # Leading zeros are not an address (ipaddress refuses them): the paren form is tried next.
    assert parse_received("from h ([192.0.2.01]) by mx").ip is None
    # An IPv4-mapped address in a header stays as written (only parse_ip unwraps it).
    assert parse_received("from h ([IPv6:::ffff:192.0.2.9]) by mx").ip == "::ffff:c000:209"


def test_parse_ip_unwraps_mapped_addresses_and_refuses_garbage() -> None:
    import ipaddress

    from trustmilter.received import in_networks, parse_ip
    assert parse_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert parse_ip(ipaddress.ip_address("192.0.2.1")) == ipaddress.ip_address("192.0.2.1")
    assert parse_ip("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    for bad in ("", None, "not an ip", "192.0.2.256", "1.2.3"):
        assert parse_ip(bad) is None
    # The same text asked again (memoised) gives the same answer.
    assert parse_ip("192.0.2.256") is None and parse_ip("::ffff:192.0.2.1").version == 4
    nets = parse_networks(["192.0.2.0/24", "2001:db8::/32"])
    assert in_networks("::ffff:192.0.2.5", nets) and in_networks("2001:db8::5", nets)
    assert not in_networks("198.51.100.1", nets) and not in_networks("junk", nets)
