"""TLS for DICOM associations (PS3.15 Annex B.9 "Basic TLS Secure Transport Connection Profile").

Contexts are built from PEM files named in the configuration; TLS 1.2 is the minimum.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from cxr_ai.errors import ConfigError

MSG_TLS_FILE = "{what} {path} does not exist or is not readable; fix [{section}] {key} or turn TLS off"


def _need(path: str | os.PathLike | None, *, what: str, section: str, key: str) -> str:
    if not path or not Path(path).is_file():
        raise ConfigError(MSG_TLS_FILE.format(what=what, path=path or "(empty)", section=section, key=key))
    return str(path)


def server_context(
    *, cert_file: str | os.PathLike, key_file: str | os.PathLike, ca_file: str | os.PathLike | None = None,
    require_client_cert: bool = False, section: str = "listener",
) -> ssl.SSLContext:
    """An SSL context for the SCP. With ``require_client_cert``, callers must present a
    certificate signed by ``ca_file`` (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(_need(cert_file, what="TLS certificate", section=section, key="tls_cert"),
                        _need(key_file, what="TLS key", section=section, key="tls_key"))
    if ca_file:
        ctx.load_verify_locations(_need(ca_file, what="TLS CA file", section=section, key="tls_ca"))
    if require_client_cert:
        if not ca_file:
            raise ConfigError(f"[{section}] tls_require_client_cert needs tls_ca (the CA that signs client certificates)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    *, ca_file: str | os.PathLike | None = None, cert_file: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None, check_hostname: bool = True, section: str = "routing",
) -> ssl.SSLContext:
    """An SSL context for the SCU: verifies the server against ``ca_file`` (or the system
    store), optionally presenting a client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=_need(ca_file, what="TLS CA file", section=section, key="tls_ca") if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert_file:
        ctx.load_cert_chain(_need(cert_file, what="TLS certificate", section=section, key="tls_cert"),
                            _need(key_file, what="TLS key", section=section, key="tls_key"))
    return ctx
