from pathlib import Path

import pytest

from trustmilter.config import load_config
from trustmilter.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "local.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_load_and_index_scores() -> None:
    config = load_config(None)
    assert config.section("dns")["timeout"] == 2.0
    assert config.score("SPF_FAIL") == config.section("spf")["scores"]["SPF_FAIL"]
    assert config.score("NO_SUCH_SYMBOL") is None
    assert config.authserv_id  # defaults to the host name


def test_local_file_overrides_only_named_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "authserv_id: mx.example.org\ndns:\n  timeout: 1\nspf:\n  scores:\n    SPF_FAIL: 4\n")
    config = load_config(path)
    assert config.authserv_id == "mx.example.org"
    assert config.section("dns")["timeout"] == 1
    assert config.section("dns")["deadline"] == 8.0
    assert config.score("SPF_FAIL") == 4.0
    assert config.score("SPF_PASS") == -0.5


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "dns:\n  timeout: 1\n  timout: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.file == path and err.value.line == 3 and err.value.key == "dns.timout"
    assert f"{path}:3: key 'dns.timout'" in str(err.value)


def test_wrong_type_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "actions:\n  shadow: 'yes'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "actions.shadow" and err.value.line == 2


def test_new_symbol_scores_allowed_but_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "spf:\n  scores:\n    MY_SYMBOL: 1.5\n"))
    assert config.score("MY_SYMBOL") == 1.5
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "spf:\n  scores:\n    MY_SYMBOL: high\n"))
    assert err.value.key == "spf.scores.MY_SYMBOL"


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "dns:\n  timeout: [1,\n  x: 2\n"))
    assert err.value.line is not None and err.value.file is not None


def test_duplicate_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "dns:\n  timeout: 1\n  timeout: 2\n"))
    assert err.value.line == 3 and "duplicate" in str(err.value)


def test_yaml_cannot_construct_objects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "authserv_id: !!python/object/apply:os.system ['true']\n"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "nope.yaml"))
    assert "cannot read" in str(err.value)


def test_command_line_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "dns:\n  server: 10.0.0.1\n")
    config = load_config(path, {"dns": {"server": "127.0.0.1:5353"}})
    assert config.section("dns")["server"] == "127.0.0.1:5353"
