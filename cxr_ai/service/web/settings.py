"""The ``[web]`` settings, validated once at the edge."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_ai.errors import ConfigError

MSG_WEB = "[web] {key} must be {what}, got {value!r}"
MSG_TLS_PAIR = "[web] tls_cert and tls_key go together: give both files, or neither"


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebSettings:
    """What the pages need to know; see ``[web]`` in ``defaults.toml``."""

    enabled: bool
    host: str
    users_file: Path
    secret_file: Path
    audit_log: Path
    feedback_db: Path
    trusted_proxy_header: str = ""
    trusted_proxies: tuple[str, ...] = ()
    trusted_proxy_role: str = "radiologist"
    idle_timeout_seconds: float = 1800.0
    lockout_failures: int = 5
    lockout_seconds: float = 900.0
    tls_cert: str = ""
    tls_key: str = ""
    viewer_url: str = ""
    max_body_bytes: int = 65536
    page_size: int = 50
    image_max_side: int = 1024
    max_upload_bytes: int = 50 * 2**20
    rgb_tolerance: int = 2
    keep_uploads: bool = False
    uploads_dir: Path | None = None
    download_ttl_seconds: float = 600.0
    second_opinion_per_minute: int = 10
    ops_refresh_seconds: float = 15.0

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def https(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @classmethod
    def for_service(cls, config: Mapping[str, Any], settings: Any) -> WebSettings:
        """The web settings as the service resolves them (``settings``: its
        :class:`~cxr_ai.service.settings.ServiceSettings`): relative paths under the store
        root's folder. The command lines that touch the same files (users, audit log) use this."""
        return cls.from_config(config, store_root=settings.store_root, host=settings.http_host,
                               base_dir=settings.store_root.parent)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, store_root: Path, host: str = "127.0.0.1",
                    base_dir: Path | None = None) -> WebSettings:
        web = dict(config.get("web") or {})
        base = base_dir or Path.cwd()

        def path(key: str, default: Path) -> Path:
            value = web.get(key) or ""
            if not isinstance(value, str):
                raise ConfigError(MSG_WEB.format(key=key, what="a file path or \"\"", value=value))
            p = Path(value) if value else default
            return p if p.is_absolute() else base / p

        def number(key: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> Any:
            value = web.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (
                    integer and int(value) != value):
                what = f"{'an integer' if integer else 'a number'} >= {minimum:g}"
                raise ConfigError(MSG_WEB.format(key=key, what=what, value=value))
            return int(value) if integer else float(value)

        def _flag(key: str) -> bool:
            value = web.get(key, False)
            if not isinstance(value, bool):
                raise ConfigError(MSG_WEB.format(key=key, what="true or false", value=value))
            return value

        proxies = web.get("trusted_proxies", [])
        if not isinstance(proxies, list) or not all(isinstance(p, str) for p in proxies):
            raise ConfigError(MSG_WEB.format(key="trusted_proxies", what="a list of addresses", value=proxies))
        for p in proxies:
            try:
                ipaddress.ip_address(p)
            except ValueError:
                raise ConfigError(MSG_WEB.format(key="trusted_proxies", what="a list of IP addresses",
                                                 value=proxies)) from None
        role = web.get("trusted_proxy_role", "radiologist")
        if role not in ("radiologist", "admin"):
            raise ConfigError(MSG_WEB.format(key="trusted_proxy_role", what="'radiologist' or 'admin'", value=role))
        cert, key = str(web.get("tls_cert") or ""), str(web.get("tls_key") or "")
        if bool(cert) != bool(key):
            raise ConfigError(MSG_TLS_PAIR)
        for k, v in (("tls_cert", cert), ("tls_key", key)):
            if v and not (Path(v) if Path(v).is_absolute() else base / v).is_file():
                raise ConfigError(f"[web] {k} {v} does not exist; give the PEM file of the web port's certificate")
        viewer = str(web.get("viewer_url") or "")
        if viewer and not viewer.startswith(("http://", "https://")):
            raise ConfigError(MSG_WEB.format(key="viewer_url", what="an http(s) URL template", value=viewer))
        return cls(
            enabled=bool(web.get("enabled", True)),
            host=host,
            users_file=path("users_file", store_root / "users.toml"),
            secret_file=path("session_secret_file", store_root / "web-secret"),
            audit_log=path("audit_log", store_root / "audit.jsonl"),
            feedback_db=path("feedback_db", store_root / "feedback.sqlite3"),
            trusted_proxy_header=str(web.get("trusted_proxy_header") or ""),
            trusted_proxies=tuple(proxies),
            trusted_proxy_role=role,
            idle_timeout_seconds=number("idle_timeout_minutes", 30.0, minimum=1.0) * 60.0,
            lockout_failures=number("lockout_failures", 5, minimum=1, integer=True),
            lockout_seconds=number("lockout_minutes", 15.0, minimum=0.0) * 60.0,
            tls_cert=str(base / cert) if cert and not Path(cert).is_absolute() else cert,
            tls_key=str(base / key) if key and not Path(key).is_absolute() else key,
            viewer_url=viewer,
            max_body_bytes=number("max_body_bytes", 65536, minimum=1024, integer=True),
            page_size=number("page_size", 50, minimum=1, integer=True),
            image_max_side=number("image_max_side", 1024, minimum=64, integer=True),
            max_upload_bytes=int(number("max_upload_mb", 50.0, minimum=0.001) * 2**20),
            rgb_tolerance=number("rgb_tolerance", 2, minimum=0, integer=True),
            keep_uploads=_flag("keep_uploads"),
            uploads_dir=path("uploads_dir", store_root / "uploads"),
            download_ttl_seconds=number("download_ttl_seconds", 600.0, minimum=1.0),
            second_opinion_per_minute=number("second_opinion_per_minute", 10, minimum=1, integer=True),
            ops_refresh_seconds=number("ops_refresh_seconds", 15.0, minimum=1.0),
        )


def session_secret(path: Path) -> str:
    """The cookie-signing secret, created (mode 0600) on first use."""
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if len(text) >= 32:
            return text
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    return secret
