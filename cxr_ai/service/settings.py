"""The listener's settings: the ``[listener] [store] [workers] [routing] [http]`` sections,
checked once by :func:`validate_config` into a :class:`ServiceSettings`.

One pydantic model per section says each key's type and range; its ``description`` is the
"what" of the error message (``[store] quiet_seconds must be seconds >= 0, got 'soon'``). Types
are strict: ``true`` is not a number and ``"8"`` is not a port; an integer is accepted where a
number of seconds is asked for. The models ignore keys they do not declare: the loader
(:func:`cxr_ai.config.merge_settings`) has already refused every key the embedded defaults do
not have, so a typo never reaches them.

Secrets are not read here: ``secrets`` maps the names of environment variables (``token_env``)
to their values, read once at the edge (:func:`cxr_ai.config.load_settings`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from cxr_ai.errors import ConfigError
from cxr_ai.net.scp import ListenerSettings
from cxr_ai.net.tls import server_context
from cxr_ai.service.routing import Destination, RetryPolicy, build_destination

MSG_SECTION_TYPE = "[{section}] {key} must be {what}, got {value!r}"
MSG_AE_TITLE = "[{section}] {key} {value!r} is not a valid AE title (1-16 characters, no backslash or control characters)"
MSG_NO_SECTION = "configuration has no [{section}] section"
MSG_DUPLICATE_DESTINATIONS = "[routing] destinations have duplicate names: {names}"

_AE_TITLE_ERROR = "ae_title"


# -- field types ------------------------------------------------------------------------------
def _ae_title(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value or any(ord(c) < 32 for c in value):
        raise PydanticCustomError(_AE_TITLE_ERROR, "not a valid AE title", {"value": value})
    return value.strip()


def _calling_aes(values: list[Any]) -> list[str]:
    return [v if v == "*" else _ae_title(v) for v in values]


def _check(test: Callable[[Any], bool]) -> AfterValidator:
    def run(value: Any) -> Any:
        if not test(value):
            raise ValueError("out of range")
        return value

    return AfterValidator(run)


def _lower_one_of(*choices: str) -> AfterValidator:
    def run(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError("not one of the choices")
        return value.lower()

    return AfterValidator(run)


AeTitle = Annotated[str, PlainValidator(_ae_title)]
Port = Annotated[int, Field(ge=0, lt=65536, description="a TCP port (0-65535; 0 picks a free one)")]
Host = Annotated[str, Field(description="a host name or address")]
Flag = Annotated[bool, Field(description="true or false")]
PositiveInt = Annotated[int, Field(gt=0, description="a positive integer")]
Seconds = Annotated[float, Field(gt=0, description="seconds > 0")]
SecondsOrZero = Annotated[float, Field(ge=0, description="seconds >= 0")]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


# -- the sections -----------------------------------------------------------------------------
class ListenerSection(_Section):
    """``[listener]``: the DICOM listener (AE title, limits, timeouts, TLS)."""

    allowed_calling_aes: Annotated[list[Any], Field(min_length=1),
                                   AfterValidator(_calling_aes)] = Field(
        description='a non-empty list of AE titles (or ["*"] for any)')
    tls: Flag
    tls_cert: str = Field("", description="a certificate file path")
    tls_key: str = Field("", description="a key file path")
    tls_ca: str = Field("", description="a CA file path ('' = none)")
    tls_require_client_cert: Flag = False
    ae_title: AeTitle = Field(description="an AE title (1-16 characters)")
    host: Host
    port: Port
    require_called_ae: Flag
    max_pdu: Annotated[int, _check(lambda v: v == 0 or v >= 4096)] = Field(
        description="0 (unlimited) or a PDU size >= 4096")
    max_associations: PositiveInt
    min_free_mb: float = Field(ge=0, description="a number of MiB >= 0")
    max_associations_per_address: int = Field(gt=0, description="a positive integer (at most max_associations)")
    max_inflated_mb: float = Field(gt=0, description="a number of MiB > 0")
    acse_timeout: Seconds
    dimse_timeout: Seconds
    network_timeout: Seconds
    pdu_timeout: Seconds
    fast_receive: Flag = True
    stale_temp_minutes: float = Field(gt=0, description="minutes > 0")


class StoreSection(_Section):
    """``[store]``: where received files, results and the job store live."""

    root: str = Field(min_length=1, description="a folder path")
    spool_dir: str = Field("", description="a folder path ('' = <root>/spool)")
    db: str = Field("", description="a file path ('' = <root>/jobs.sqlite3)")
    keep_hours: Annotated[float, _check(lambda v: v >= 0 or v == -1)] = Field(
        description="hours >= 0, or -1 to keep files forever")
    retract_keep_hours: Annotated[float, _check(lambda v: v >= 0 or v == -1)] = Field(
        description="hours >= 0, or -1 to keep result headers forever")
    quiet_seconds: SecondsOrZero
    max_open_seconds: Seconds
    sqlite_synchronous: Annotated[str, _lower_one_of("full", "normal")] = Field(description="'full' or 'normal'")


class WorkersSection(_Section):
    """``[workers]``: the worker pool and the pipeline it calls."""

    pipeline: Annotated[str, _check(lambda v: ":" in v)] = Field(description="'package.module:Name'")
    count: PositiveInt
    max_batch_studies: PositiveInt
    poll_seconds: Seconds
    pipeline_retry_seconds: Seconds
    idle_start: Flag
    max_attempts: PositiveInt
    shutdown_grace_seconds: SecondsOrZero


class RoutingSection(_Section):
    """``[routing]``: retries and the destinations (each checked by :func:`build_destination`)."""

    max_attempts: PositiveInt
    backoff_initial_seconds: Seconds
    backoff_max_seconds: Seconds
    destinations: list[dict[str, Any]] = Field(description="a list of destination tables")
    poll_seconds: Seconds


class HttpSection(_Section):
    """``[http]``: the web pages, ``/healthz`` and ``/metrics``."""

    enabled: Flag
    host: Host
    port: Port


SECTIONS: dict[str, type[_Section]] = {"listener": ListenerSection, "store": StoreSection,
                                       "workers": WorkersSection, "routing": RoutingSection, "http": HttpSection}


S = TypeVar("S", bound=_Section)


def _section(config: Mapping[str, Any], name: str, model: type[S]) -> S:
    values = config.get(name)
    if not isinstance(values, Mapping):
        raise ConfigError(MSG_NO_SECTION.format(section=name))
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise _config_error(exc.errors()[0], section=name, model=model, values=values) from None


def _config_error(error: ErrorDetails, *, section: str, model: type[_Section], values: Mapping[str, Any]) -> ConfigError:
    """The message of the first key that failed: what it must be, and the value it has."""
    key = str(error["loc"][0])
    info = model.model_fields[key]
    if error["type"] == _AE_TITLE_ERROR or any(getattr(m, "func", None) is _ae_title for m in info.metadata):
        value = (error.get("ctx") or {}).get("value", values.get(key))
        return ConfigError(MSG_AE_TITLE.format(section=section, key=key, value=value))
    value = values.get(key)
    if info.annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # accepted as a number, refused for its range: shown as the number it is
    return ConfigError(MSG_SECTION_TYPE.format(section=section, key=key, what=info.description, value=value))


# -- the result -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceSettings:
    """The service's configuration sections, validated."""

    listener: ListenerSettings
    spool_dir: Path
    db_path: Path
    store_root: Path
    quiet_seconds: float
    max_open_seconds: float
    keep_seconds: float | None  # None keeps spool files forever
    retract_keep_seconds: float | None  # result headers after keep_seconds; None: forever
    sqlite_synchronous: str
    workers: int
    max_batch_studies: int
    worker_poll_seconds: float
    pipeline_retry_seconds: float
    idle_start: bool
    max_attempts: int
    pipeline: str
    shutdown_grace_seconds: float
    routing_policy: RetryPolicy
    routing_poll_seconds: float
    #: The triage worklist's SQLite file: ``[worklist] path``, else ``<store root>/worklist.sqlite3``.
    worklist_path: Path
    destinations: list[Destination] = field(repr=False, default_factory=list)
    http_enabled: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = 8780
    stale_temp_seconds: float = 3600.0


def validate_config(config: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None,
                    secrets: Mapping[str, str] | None = None) -> ServiceSettings:
    """Check the ``[listener] [store] [workers] [routing] [http]`` sections; clear errors.

    Relative paths are resolved against ``base_dir`` (default: the working directory).
    ``secrets`` holds the values of the environment variables that destinations name in
    ``token_env`` (:attr:`cxr_ai.config.Settings.secrets`); a name missing from it is an error.
    """
    base = Path(base_dir or os.getcwd()).resolve()
    li = _section(config, "listener", ListenerSection)
    st = _section(config, "store", StoreSection)
    wk = _section(config, "workers", WorkersSection)
    rt = _section(config, "routing", RoutingSection)
    ht = _section(config, "http", HttpSection)
    ssl_ctx = None
    if li.tls:
        ssl_ctx = server_context(cert_file=li.tls_cert, key_file=li.tls_key, ca_file=li.tls_ca or None,
                                 require_client_cert=li.tls_require_client_cert)
    listener = ListenerSettings(
        ae_title=li.ae_title, host=li.host, port=li.port, allowed_calling_aes=li.allowed_calling_aes,
        require_called_ae=li.require_called_ae, max_pdu=li.max_pdu, max_associations=li.max_associations,
        min_free_bytes=int(li.min_free_mb * 2**20), max_associations_per_address=li.max_associations_per_address,
        max_inflated_bytes=int(li.max_inflated_mb * 2**20), acse_timeout=li.acse_timeout,
        dimse_timeout=li.dimse_timeout, network_timeout=li.network_timeout, pdu_timeout=li.pdu_timeout,
        fast_receive=li.fast_receive, ssl_context=ssl_ctx,
    )
    root = Path(st.root)
    root = root if root.is_absolute() else base / root
    spool_dir = Path(st.spool_dir or root / "spool")
    db_path = Path(st.db or root / "jobs.sqlite3")
    destinations = [build_destination(s, calling_ae=li.ae_title, base_dir=base, secrets=secrets)
                    for s in rt.destinations]
    names = [d.name for d in destinations]
    if len(set(names)) != len(names):
        raise ConfigError(MSG_DUPLICATE_DESTINATIONS.format(names=names))
    fhir_destinations = [d.name for d in destinations if d.kind == "fhir"]
    if fhir_destinations:  # a patient the FHIR server cannot match is worse than no delivery
        from cxr_ai.fhir import FhirOptions, require_patient_system

        require_patient_system(FhirOptions.from_config(config), destination=fhir_destinations[0])
    return ServiceSettings(
        listener=listener,
        spool_dir=spool_dir if spool_dir.is_absolute() else base / spool_dir,
        db_path=db_path if db_path.is_absolute() else base / db_path,
        store_root=root,
        quiet_seconds=st.quiet_seconds,
        max_open_seconds=st.max_open_seconds,
        keep_seconds=None if st.keep_hours == -1 else st.keep_hours * 3600.0,
        retract_keep_seconds=None if st.retract_keep_hours == -1 else st.retract_keep_hours * 3600.0,
        sqlite_synchronous=st.sqlite_synchronous,
        workers=wk.count,
        max_batch_studies=wk.max_batch_studies,
        worker_poll_seconds=wk.poll_seconds,
        pipeline_retry_seconds=wk.pipeline_retry_seconds,
        idle_start=wk.idle_start,
        max_attempts=wk.max_attempts,
        pipeline=wk.pipeline,
        shutdown_grace_seconds=wk.shutdown_grace_seconds,
        routing_policy=RetryPolicy(max_attempts=rt.max_attempts, backoff_initial=rt.backoff_initial_seconds,
                                   backoff_max=rt.backoff_max_seconds),
        routing_poll_seconds=rt.poll_seconds,
        destinations=destinations,
        http_enabled=ht.enabled,
        http_host=ht.host,
        http_port=ht.port,
        stale_temp_seconds=li.stale_temp_minutes * 60.0,
        worklist_path=Path(config.get("worklist", {}).get("path") or root / "worklist.sqlite3"),
    )
