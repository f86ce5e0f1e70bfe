"""Settings resolved once at the edge: ``load_settings`` reads the file, the environment and the
tokens it names; the listener's sections are checked by one pydantic model each."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cxr_ai.config import Settings, config_to_toml, default_config, load_settings, secret_names
from cxr_ai.errors import ConfigError
from cxr_ai.service import MSG_AE_TITLE, MSG_SECTION_TYPE, Service, validate_config
from cxr_ai.service.cli import jobs_main
from cxr_ai.service.settings import SECTIONS


def _site(tmp_path: Path, **sections: dict) -> Path:
    values = {"store": {"root": str(tmp_path / "var")}, "listener": {"port": 0}, "http": {"port": 0}}
    for name, table in sections.items():
        values.setdefault(name, {}).update(table)
    path = tmp_path / "site.toml"
    path.write_text(config_to_toml(values))
    return path


FHIR = {"default_patient_identifier_system": "urn:oid:2.16.840.1.113883.19.5"}
EHR = {"name": "ehr", "kind": "fhir", "url": "http://127.0.0.1:9/fhir", "token_env": "SITE_FHIR_TOKEN"}


def test_every_key_of_the_service_sections_has_a_type_and_says_what_it_must_be() -> None:
    defaults = default_config()
    for name, model in SECTIONS.items():
        assert set(defaults[name]) == set(model.model_fields), name
        assert all(info.description for info in model.model_fields.values()), name


@pytest.mark.parametrize(("section", "key", "value", "what"), [
    ("listener", "port", True, "a TCP port (0-65535; 0 picks a free one)"),     # a bool is not an int
    ("listener", "port", "104", "a TCP port (0-65535; 0 picks a free one)"),    # nor is a string
    ("workers", "count", 2.0, "a positive integer"),                             # nor a float
    ("store", "quiet_seconds", False, "seconds >= 0"),                           # a bool is not a number
    ("http", "enabled", 1, "true or false"),
    ("store", "sqlite_synchronous", "off", "'full' or 'normal'"),
    ("store", "keep_hours", -2.0, "hours >= 0, or -1 to keep files forever"),
    ("store", "retract_keep_hours", -0.5, "hours >= 0, or -1 to keep result headers forever"),
    ("listener", "max_pdu", 1024, "0 (unlimited) or a PDU size >= 4096"),
    ("listener", "allowed_calling_aes", [], 'a non-empty list of AE titles (or ["*"] for any)'),
    ("routing", "destinations", {"name": "x"}, "a list of destination tables"),
    ("workers", "pipeline", "cxr_ai.pipeline.Pipeline", "'package.module:Name'"),
])
def test_types_are_strict_and_the_message_names_the_key(section: str, key: str, value: object, what: str) -> None:
    config = default_config()
    config[section][key] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert str(info.value) == MSG_SECTION_TYPE.format(section=section, key=key, what=what, value=value)


def test_an_int_passes_as_a_number_and_ae_titles_are_trimmed(tmp_path: Path) -> None:
    config = default_config()
    config["store"].update(quiet_seconds=1, keep_hours=-1)
    config["listener"].update(ae_title=" CXR_AI ", allowed_calling_aes=["*", " PACS "], min_free_mb=0)
    s = validate_config(config, base_dir=tmp_path)
    assert s.quiet_seconds == 1.0 and isinstance(s.quiet_seconds, float) and s.keep_seconds is None
    assert s.listener.ae_title == "CXR_AI" and list(s.listener.allowed_calling_aes) == ["*", "PACS"]
    config["listener"]["allowed_calling_aes"] = ["PACS", 104]
    with pytest.raises(ConfigError) as info:
        validate_config(config, base_dir=tmp_path)
    assert str(info.value) == MSG_AE_TITLE.format(section="listener", key="allowed_calling_aes", value=104)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 3  # type: ignore[misc]


def test_load_settings_reads_the_tokens_it_names_and_no_other_variable(tmp_path: Path) -> None:
    site = _site(tmp_path, routing={"destinations": [EHR]}, fhir=FHIR,
                 monitoring={"fhir_truth_token_env": "SITE_TRUTH_TOKEN"})
    env = {"SITE_FHIR_TOKEN": "s3cr3t", "UNRELATED": "x", "CXR_AI__WORKERS__COUNT": "3"}
    settings = load_settings(site, env=env, base_dir=tmp_path)
    assert secret_names(settings.config) == ["SITE_FHIR_TOKEN", "SITE_TRUTH_TOKEN"]
    assert settings.secrets == {"SITE_FHIR_TOKEN": "s3cr3t"}       # the unset one is not invented
    assert settings.config["workers"]["count"] == 3 and settings.base_dir == tmp_path.resolve()
    assert settings.source == site and "s3cr3t" not in repr(settings)
    settings.config["workers"]["count"] = 99                        # a copy: what others read stays
    assert settings.config["workers"]["count"] == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.secrets = {}  # type: ignore[misc]
    s = validate_config(settings.config, base_dir=settings.base_dir, secrets=settings.secrets)
    assert [d.name for d in s.destinations] == ["ehr"]
    # the monitor's token is named but not set: the service says which variable
    with pytest.raises(ConfigError, match=r"\[monitoring\] fhir_truth_token_env names SITE_TRUTH_TOKEN, which is not set"):
        Service(settings.config, secrets=settings.secrets, base_dir=tmp_path)


def test_nothing_below_the_edge_reads_the_environment(tmp_path: Path, monkeypatch) -> None:
    """The token is in the process environment, but only the edge reads it."""
    monkeypatch.setenv("SITE_FHIR_TOKEN", "s3cr3t")
    config = load_settings(_site(tmp_path, routing={"destinations": [EHR]}, fhir=FHIR), env={}).config
    with pytest.raises(ConfigError, match="environment variable SITE_FHIR_TOKEN .token_env. is not set"):
        validate_config(config, base_dir=tmp_path)
    assert isinstance(load_settings(env={}), Settings)


def test_the_cli_passes_the_tokens_down(tmp_path: Path, monkeypatch, capsys) -> None:
    site = _site(tmp_path, routing={"destinations": [EHR]}, fhir=FHIR)
    monkeypatch.delenv("SITE_FHIR_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="SITE_FHIR_TOKEN"):
        jobs_main(["--config", str(site)])
    monkeypatch.setenv("SITE_FHIR_TOKEN", "s3cr3t")
    assert jobs_main(["--config", str(site)]) == 0
    assert "s3cr3t" not in capsys.readouterr().out
