"""Configuration: embedded defaults (``defaults.toml``), a site TOML file, then environment.

Environment overrides use ``CXR_AI__<SECTION>__<KEY>`` (values parsed as TOML literals when
they parse, else kept as strings), so containers and systemd units can change one key without
shipping a file.

This module and the command-line entry points are the edge: :func:`load_settings` reads the
file and the environment once, into a :class:`Settings`, and everything below receives its
parts as arguments. Nothing below the edge reads the environment or a configuration file
(``tests/test_architecture.py`` checks it); without a configuration a part uses the embedded
defaults (:func:`default_config`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from cxr_ai.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "CXR_AI__"
#: Keys whose value names an environment variable holding a secret (a bearer token).
SECRET_KEY_SUFFIX = "token_env"


@dataclass(frozen=True)
class Settings:
    """What a command knows from outside the process, read once at the edge.

    ``config`` is the merged configuration (defaults, site file, environment); each access
    gives a fresh copy, so no part can change what another reads. ``secrets`` holds the values
    of the environment variables that ``*token_env`` keys name (only those that are set; the
    part that needs one says which is missing). ``base_dir`` is the folder relative paths are
    relative to.
    """

    base_dir: Path
    source: Path | None = None  # the site file; None: defaults and environment only
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    merged: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.merged))


def load_settings(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None,
                  base_dir: str | os.PathLike | None = None) -> Settings:
    """The one place a command reads its configuration file and the environment.

    ``env`` defaults to the process environment; ``base_dir`` to the working directory.
    Raises :class:`ConfigError` as :func:`load_config` does.
    """
    env = os.environ if env is None else env
    config = load_config(path, env=env)
    secrets = {name: env[name] for name in secret_names(config) if env.get(name)}
    return Settings(base_dir=Path(base_dir or os.getcwd()).resolve(),
                    source=Path(path) if path is not None else None, secrets=secrets, merged=config)


def secret_names(config: Mapping[str, Any]) -> list[str]:
    """The environment variable names that ``*token_env`` keys anywhere in ``config`` give."""

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if str(key).endswith(SECRET_KEY_SUFFIX) and isinstance(item, str):
                    if item:
                        yield item
                else:
                    yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    return sorted(set(walk(config)))


def default_config() -> dict[str, Any]:
    """The embedded defaults as a fresh dictionary."""
    text = resources.files("cxr_ai").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_config(
    path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Defaults, overlaid by ``path`` (TOML) and by ``CXR_AI__SECTION__KEY`` variables.

    Raises
    ------
    ConfigError
        When the file is missing or not TOML, or names a section or key that does not exist
        (a typo must not silently fall back to a default).
    """
    config = default_config()
    if path is not None:
        user = read_toml(path, what="config file", hint="pass an existing TOML file or omit --config")
        merge_settings(config, user, where=str(path))
    env = os.environ if env is None else env
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        merge_settings(config, {parts[0]: {parts[1]: _parse_env_value(raw)}}, where=f"environment {name}")
    return config


def read_toml(path: str | os.PathLike, *, what: str, hint: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or bad TOML is a :class:`ConfigError` naming ``what``
    and the file (``hint`` says what to do when it does not exist)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; {hint}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {p} is not valid TOML: {exc}") from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def config_to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A site config file (``[section]`` tables of plain values) that :func:`load_config` reads
    back; for tools and tests that start a service with settings of their own."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def merge_settings(base: dict[str, Any], update: Mapping[str, Any], *, where: str, prefix: str = "",
                   noun: str = "setting", open_tables: frozenset[str] = frozenset()) -> None:
    """Overlay ``update`` on ``base`` in place, refusing keys ``base`` does not have.

    Tables named in ``open_tables`` (e.g. a network's free-form ``kwargs``) are replaced whole
    instead of being checked key by key. ``noun`` names the kind of setting in messages.
    """
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base)) or "(none)"
            raise ConfigError(f"{where}: unknown {noun} {dotted!r}; known here: {known}")
        if isinstance(base[key], dict) and key not in open_tables:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {dotted!r} is a section; give it a table, not {value!r}")
            merge_settings(base[key], value, where=where, prefix=dotted + ".", noun=noun, open_tables=open_tables)
        else:
            base[key] = copy.deepcopy(value)
