import authres

from trustmilter import authresults


def test_build_none_and_parse_back() -> None:
    value = authresults.build("mx.test.example", [])
    assert value == "mx.test.example; none"
    assert authresults.parse(value).authserv_id == "mx.test.example"


def test_build_parses_back_with_results() -> None:
    value = authresults.build("mx.test.example", [
        authres.SPFAuthenticationResult(result="pass", smtp_mailfrom="a@example.org")])
    parsed = authresults.parse(value)
    assert parsed.results[0].method == "spf" and parsed.results[0].result == "pass"


def test_forged_indexes_case_insensitive_reverse_order() -> None:
    values = ["other.example; spf=pass smtp.mailfrom=x@y.z",
              "MX.Test.Example; dkim=pass header.d=bank.example",
              "mx.test.example; spf=pass smtp.mailfrom=a@b.c",
              "mx.test.example;;; garbage that authres cannot parse ((("]
    assert authresults.forged_indexes(values, "mx.test.example") == [4, 3, 2]


def test_similar_id_is_not_ours() -> None:
    assert not authresults.claims_authserv_id("mx.test.example.evil; none", "mx.test.example")
