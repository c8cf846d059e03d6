"""Configuration: embedded defaults (``data/defaults.yaml``, never edited by admins) overlaid by a
local YAML file. Every key a local file sets must exist in the defaults and have the same type;
any mistake is a ``ConfigError`` naming file, line and key.
"""
from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from trustmilter.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/trustmilter/trustmilter.yaml"
# Sections whose keys are free-form (symbol names, list names): their values are type-checked
# against the section's first default value, but new keys are allowed.
OPEN_SECTIONS = frozenset({"scores", "lists"})


class _MarkedLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of every mapping key (for error messages)."""


def _construct_mapping(loader: _MarkedLoader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    out: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ConfigError("mapping keys must be strings", file=loader.name,
                              line=key_node.start_mark.line + 1, key=str(key))
        if key in out:
            raise ConfigError("duplicate key", file=loader.name, line=key_node.start_mark.line + 1,
                              key=key)
        out[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    return _LineDict(out, lines)


class _LineDict(dict):  # type: ignore[type-arg]
    """A dict that knows the source line of each key."""

    def __init__(self, data: dict[str, Any], lines: dict[str, int]) -> None:
        super().__init__(data)
        self.lines = lines


_MarkedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, filename: str) -> Any:
    """Parse YAML safely (no object construction); syntax errors name file and line."""
    loader = _MarkedLoader(text)
    loader.name = filename
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(f"YAML syntax error: {exc.problem or exc}", file=filename, line=line) from None
    finally:
        loader.dispose()


def _defaults() -> dict[str, Any]:
    text = resources.files("trustmilter").joinpath("data/defaults.yaml").read_text("utf-8")
    data = load_yaml(text, "<defaults>")
    assert isinstance(data, dict)
    return _plain(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _merge(base: dict[str, Any], local: dict[str, Any], file: str, path: str) -> None:
    lines = getattr(local, "lines", {})
    for key, value in local.items():
        dotted = f"{path}.{key}" if path else key
        line = lines.get(key)
        open_section = path.split(".")[-1] in OPEN_SECTIONS if path else False
        if key not in base:
            if not open_section:
                raise ConfigError("unknown setting (not in the documented defaults)", file=file,
                                  line=line, key=dotted)
            sample = next(iter(base.values()), None)
            if not _type_ok(sample, value):
                raise ConfigError(f"expected {type(sample).__name__}, got {type(value).__name__}",
                                  file=file, line=line, key=dotted)
            base[key] = _plain(value)
            continue
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError("expected a mapping", file=file, line=line, key=dotted)
            _merge(default, value, file, dotted)
        elif not _type_ok(default, value):
            raise ConfigError(f"expected {type(default).__name__}, got {type(value).__name__}",
                              file=file, line=line, key=dotted)
        else:
            base[key] = _plain(value)


@dataclass
class Config:
    """The effective configuration. ``data`` is a plain nested dict; ``source`` names its files."""

    data: dict[str, Any]
    sources: list[str] = field(default_factory=list)
    _scores: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Each check's section carries its own "scores"; index them once for the scorer.
        for name, section in self.data.items():
            if isinstance(section, dict) and isinstance(section.get("scores"), dict):
                for symbol, value in section["scores"].items():
                    self._scores[symbol] = float(value)

    def section(self, name: str) -> dict[str, Any]:
        value = self.data.get(name)
        if not isinstance(value, dict):
            raise ConfigError("no such section", key=name)
        return value

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def authserv_id(self) -> str:
        return str(self.data["authserv_id"])

    def score(self, symbol: str) -> float | None:
        """The configured score of a symbol, or None when config does not know it."""
        return self._scores.get(symbol)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``path`` (or /etc/trustmilter/trustmilter.yaml when it exists), then
    ``overrides`` (command-line options, as a nested dict)."""
    data = _defaults()
    sources = ["<defaults>"]
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=path) from None
        local = load_yaml(text, path)
        if local is not None:
            if not isinstance(local, dict):
                raise ConfigError("top level must be a mapping", file=path, line=1)
            _merge(data, local, path, "")
        sources.append(path)
    if overrides:
        _merge(data, copy.deepcopy(overrides), "<command line>", "")
        sources.append("<command line>")
    if not data.get("authserv_id"):
        data["authserv_id"] = socket.gethostname()
    return Config(data=data, sources=sources)
