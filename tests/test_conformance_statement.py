"""The committed DICOM Conformance Statement is exactly what the code generates, and the
generator reads the listener's real tables (a change to what the listener accepts changes the
document)."""

from __future__ import annotations

from pathlib import Path

from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cxr_ai import cli
from cxr_ai.conformance import DOCUMENT_PATH, _listener_ae, render
from cxr_ai.config import default_config
from cxr_ai.net.common import STORAGE_TRANSFER_SYNTAXES

REPO = Path(__file__).resolve().parents[1]


def test_committed_statement_matches_the_generator() -> None:
    committed = (REPO / DOCUMENT_PATH).read_text(encoding="utf-8")
    assert committed == render(), f"{DOCUMENT_PATH} is stale: run `make conformance-statement` and commit it"


def test_statement_lists_what_the_listener_accepts() -> None:
    text = render()
    ae, listener = _listener_ae(default_config())
    storage = [c for c in ae.supported_contexts if c.abstract_syntax != Verification]
    assert f"{len(storage)} Storage SOP Classes" in text
    for cx in storage:
        assert f"`{cx.abstract_syntax}`" in text
        assert list(cx.transfer_syntax) == STORAGE_TRANSFER_SYNTAXES
    for ts in STORAGE_TRANSFER_SYNTAXES:
        assert f"`{ts}`" in text
    for uid in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.30"):
        assert f"`{uid}`" in text  # the result objects we send
    assert f"{listener.max_pdu} bytes" in text and "TLS 1.2 minimum" in text and "allow-list" in text
    # another configuration gives another document: it is generated, not copied
    cfg = default_config()
    cfg["listener"]["max_associations"] = 7
    assert "7; one more is rejected" in render(cfg) and "7; one more is rejected" not in text


def test_cli_check_detects_a_stale_file(tmp_path, capsys) -> None:
    out = tmp_path / "cs.md"
    assert cli.main(["conformance", "--out", str(out)]) == 0
    assert cli.main(["conformance", "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert cli.main(["conformance", "--out", str(out), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
