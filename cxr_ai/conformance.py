"""The DICOM Conformance Statement (PS3.2 layout), generated from the code's own tables.

Every table comes from what the running code uses, not from a copy: the listener's
presentation contexts are read from the pynetdicom Application Entity that
:class:`cxr_ai.net.scp.StorageSCP` builds from the default ``[listener]`` settings; its
transfer syntaxes are :data:`cxr_ai.net.common.STORAGE_TRANSFER_SYNTAXES`; the result objects
are built (SR, heatmap SC, Parametric Map) and their SOP classes, transfer syntaxes and
character sets are read off them; the Query/Retrieve SOP classes are the ones
:mod:`cxr_ai.net.query` requests; TLS is :mod:`cxr_ai.net.tls`. ``cxr-ai conformance``
writes it (``make conformance-statement``) and a test checks that the committed
``docs/dicom-conformance-statement.md`` equals the generator's output, so the document cannot
drift from what the listener accepts.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

DOCUMENT_PATH = "docs/dicom-conformance-statement.md"


def _uid_name(uid: str) -> str:
    """pydicom's name of a UID, else the keyword pynetdicom gives its SOP class (newer
    classes), split into words."""
    from pydicom.uid import UID

    name = UID(uid).name
    if name != str(uid):
        return name
    return _PYNETDICOM_NAMES().get(str(uid), str(uid))


def _PYNETDICOM_NAMES() -> dict[str, str]:  # noqa: N802 - a cached table
    import re

    from pynetdicom import sop_class

    if not _NAMES:
        for keyword in dir(sop_class):
            value = getattr(sop_class, keyword)
            if isinstance(value, str) and value.startswith("1.2.840.10008."):
                _NAMES.setdefault(str(value), re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", keyword))
    return _NAMES


_NAMES: dict[str, str] = {}


def _listener_ae(config: Mapping[str, Any]) -> tuple[Any, Any]:
    from cxr_ai.net.scp import StorageSCP
    from cxr_ai.service import validate_config

    with tempfile.TemporaryDirectory() as base:
        settings = validate_config(config, base_dir=base)
    # The AE is built from the settings alone; no spool or store is touched.
    scp = StorageSCP(settings=settings.listener, spool=None, store=None, quiet_seconds=0.0)  # type: ignore[arg-type]
    return scp.ae, settings.listener


def _result_objects() -> list[Any]:
    """One of each result object, built by the writers from a synthetic source image."""
    import numpy as np

    from cxr_ai.config import default_config
    from cxr_ai.dicom.gate import GateDecision, GateReason
    from cxr_ai.outputs import outputs_for
    from cxr_ai.phantoms import make_phantom_dataset
    from cxr_ai.results import FindingResult, ImageResult, ModelInfo

    source = make_phantom_dataset(modality="DX", photometric="MONOCHROME2", size=128, random_state=0)
    heat = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    model = ModelInfo(name="model", version="1", device_uid="2.25.1")
    result = ImageResult(str(source.SOPInstanceUID), str(source.StudyInstanceUID),
                         GateDecision(True, GateReason.ACCEPTED, "ok"), model=model,
                         findings=[FindingResult("cardiomegaly", "Cardiomegaly", 0.9, 0.5, heatmap=heat)])
    cfg = default_config()
    cfg["outputs"]["segmentation"] = True  # listed too (opt-in)
    outputs = outputs_for(result, source, config=cfg)
    assert outputs is not None
    return outputs.dicom()


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(config: Mapping[str, Any] | None = None) -> str:
    """The conformance statement as Markdown (deterministic for a given code base and
    library versions). Without ``config`` it describes the product as shipped: the embedded
    defaults (``cxr_ai/defaults.toml``), never a site file or the environment."""
    import pynetdicom
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from cxr_ai import __version__
    from cxr_ai.config import default_config
    from cxr_ai.dicom import codes
    from cxr_ai.dicom.common import PM_SERIES_NUMBER, SC_SERIES_NUMBER, SR_SERIES_NUMBER
    from cxr_ai.outputs import HEATMAPS_FOR
    from cxr_ai.dicom.segmentation import SEG_SERIES_NUMBER
    from cxr_ai.net import query
    from cxr_ai.net.common import STORAGE_TRANSFER_SYNTAXES
    from cxr_ai.net.scu import MAX_CONTEXTS

    cfg = config if config is not None else default_config()
    ae, listener = _listener_ae(cfg)
    contexts = sorted(ae.supported_contexts, key=lambda c: _uid_name(c.abstract_syntax))
    storage = [c for c in contexts if c.abstract_syntax != Verification]
    verification = next(c for c in contexts if c.abstract_syntax == Verification)
    outputs = _result_objects()
    out_cfg = cfg["outputs"]

    s: list[str] = []
    s.append(f"# DICOM Conformance Statement: cxr-ai {__version__}\n")
    s.append("> Generated by `cxr-ai conformance` from the code's own tables (`cxr_ai/conformance.py`); "
             "do not edit by hand. Layout after DICOM PS3.2 Annex A. NOT FOR CLINICAL USE with the bundled "
             "demonstration model.\n")

    s.append("## 1 Conformance Statement Overview\n")
    s.append("cxr-ai receives chest radiographs from a PACS (Storage SCP), runs cardiomegaly and low-ejection-"
             "fraction models on the frontal chest CR/DX images, and sends back a Comprehensive 3D SR (TID 1500), "
             "heatmap Secondary Captures and Parametric Maps (Storage SCU). In batch it finds and retrieves "
             "studies from a PACS (Query/Retrieve SCU). It has no display and no media interchange.\n")
    s.append(_table(["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"], [
        ["Verification", "Yes", "Yes"],
        [f"{len(storage)} Storage SOP Classes (Table 4.2-1)", "No", "Yes"],
        *[[_uid_name(str(o.SOPClassUID)), "Yes", "Yes (as any storage class)"] for o in _unique_classes(outputs)],
        ["Study Root Query/Retrieve Information Model - FIND", "Yes", "No"],
        ["Study Root Query/Retrieve Information Model - GET", "Yes", "No"],
        ["Study Root Query/Retrieve Information Model - MOVE", "Yes", "No"],
    ]) + "\n")

    s.append("## 2 Table of Contents\n")
    s.append("1 Overview · 2 Contents · 3 Introduction · 4 Networking (4.1 Implementation Model, 4.2 AE "
             "Specifications, 4.3 Network Interfaces, 4.4 Configuration) · 5 Media Interchange · 6 Support of "
             "Character Sets · 7 Security · 8 Annexes (created IODs, SR template, coded terminology)\n")

    s.append("## 3 Introduction\n")
    s.append("Audience: PACS administrators and integration engineers. The AI results are preliminary, "
             "unverified and, with the demonstration model, not for clinical use. Abbreviations follow PS3.2.\n")

    s.append("## 4 Networking\n")
    s.append("### 4.1 Implementation Model\n")
    s.append("One Application Entity, the **listener** (AE title configurable, default "
             f"`{listener.ae_title}`), runs in `cxr-ai serve`: it accepts associations from the PACS, stores every "
             "instance to a durable spool before answering, and sends the result objects back to the configured "
             "DICOM destinations (C-STORE over one association per batch, retried from an outbox). The batch "
             "processor (`cxr-ai batch`) is a second Application Entity that acts as Query/Retrieve SCU and, for "
             "C-MOVE, as a temporary Storage SCP on 127.0.0.1.\n")
    s.append(_table(["Item", "Value"], [
        ["Implementation Class UID", f"`{pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}` (pynetdicom)"],
        ["Implementation Version Name", f"`{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}`"],
    ]) + "\n")

    s.append("### 4.2 AE Specifications\n")
    s.append("#### 4.2.1 Listener AE: SOP Classes (SCP)\n")
    s.append("Table 4.2-1: every storage SOP class below is accepted as SCP and stored; the pipeline then "
             "processes only frontal chest CR/DX images (Computed Radiography, Digital X-Ray For Presentation / "
             "For Processing) and marks every other instance *not applicable* (its reason is kept and logged). "
             "Role: SCP only (no SCP/SCU role selection), no extended negotiation.\n")
    s.append(_table(["SOP Class", "UID"], [[_uid_name(c.abstract_syntax), f"`{c.abstract_syntax}`"] for c in storage]))
    s.append("")
    s.append(f"Verification (`{Verification}`) is accepted with: "
             + ", ".join(f"{_uid_name(t)} (`{t}`)" for t in verification.transfer_syntax) + ".\n")
    s.append("#### 4.2.2 Transfer Syntaxes accepted for every storage SOP class\n")
    s.append(_table(["Transfer Syntax", "UID"], [[_uid_name(t), f"`{t}`"] for t in STORAGE_TRANSFER_SYNTAXES]) + "\n")
    s.append("The SCP accepts the first transfer syntax the requestor proposes that is in this list. Data sets "
             "are written to disk as received (not decoded, not transcoded).\n")

    s.append("#### 4.2.3 Association policies (listener)\n")
    s.append(_table(["Policy", "Value", "Configuration"], [
        ["Association initiation", "Only to send results (SCU) and in batch (Q/R SCU)", "`[[routing.destinations]]`"],
        ["Maximum PDU size received", f"{listener.max_pdu} bytes", "`[listener] max_pdu`"],
        ["Maximum simultaneous associations", f"{listener.max_associations}; one more is rejected "
         "(rejected-transient, local limit exceeded)", "`[listener] max_associations`"],
        ["Simultaneous associations per peer address", f"{listener.max_associations_per_address}; "
         "connections past it are closed at accept", "`[listener] max_associations_per_address`"],
        ["Larger PDU received", "A-ABORT from the PDU header, nothing buffered", "`[listener] max_pdu`"],
        ["Asynchronous operations window", "Not supported (1 outstanding operation)", "-"],
        ["Called AE title", "must equal ours" if listener.require_called_ae else "not checked",
         "`[listener] require_called_ae`"],
        ["Calling AE titles", "allow-list; others rejected-permanent, service-user, calling AE title not "
         f"recognized (default list: {', '.join(listener.allowed_calling_aes)})", "`[listener] allowed_calling_aes`"],
        ["ARTIM / ACSE timeout", f"{listener.acse_timeout:g} s", "`[listener] acse_timeout`"],
        ["DIMSE timeout", f"{listener.dimse_timeout:g} s", "`[listener] dimse_timeout`"],
        ["Network timeout (idle association released)", f"{listener.network_timeout:g} s",
         "`[listener] network_timeout`"],
        ["PDU timeout (a begun PDU must arrive whole)", f"{listener.pdu_timeout:g} s; then A-ABORT",
         "`[listener] pdu_timeout`"],
        ["C-STORE success", "only after the instance is on disk (fsync) and recorded in the job store", "-"],
        ["C-STORE refused", "0xA700 out of resources below the free-disk watermark; 0xA9xx data set does "
         "not match SOP class (UID mismatch, truncated data set); 0xA700 when a Deflated data set inflates past "
         f"{listener.max_inflated_bytes // (1024 * 1024)} MiB; 0xC000 cannot understand (damaged deflate "
         "stream, sequences nested too deep)", "`[listener] min_free_mb`, `max_inflated_mb`"],
    ]) + "\n")

    s.append("#### 4.2.4 Listener / batch AE: SOP Classes (SCU)\n")
    rows = []
    for o in _unique_objects(outputs):
        ts = str(o.file_meta.TransferSyntaxUID)
        rows.append([_uid_name(str(o.SOPClassUID)), f"`{o.SOPClassUID}`", f"{_uid_name(ts)} (`{ts}`)"])
    s.append(_table(["Result object SOP Class", "UID", "Transfer syntax proposed"], rows) + "\n")
    s.append("The Segmentation is sent only with `[outputs] segmentation = true`; the others follow "
             "`[outputs] sr`, `heatmap_sc` and `parametric_map`.\n")
    s.append("Each result object is proposed in its own transfer syntax plus Explicit and Implicit VR Little "
             f"Endian; at most {MAX_CONTEXTS} presentation contexts per association. C-STORE statuses Success "
             "and Warning count as delivered; anything else, a rejected association or a lost connection leaves "
             "the objects in the outbox for a later retry. The Parametric Map's transfer syntax is "
             "`[outputs] pm_transfer_syntax`.\n")
    s.append(_table(["Query/Retrieve SOP Class (batch, SCU)", "UID"], [
        [_uid_name(query.StudyRootQueryRetrieveInformationModelFind),
         f"`{query.StudyRootQueryRetrieveInformationModelFind}`"],
        [_uid_name(query.StudyRootQueryRetrieveInformationModelGet),
         f"`{query.StudyRootQueryRetrieveInformationModelGet}` (storage sub-operations as SCP, role selection)"],
        [_uid_name(query.StudyRootQueryRetrieveInformationModelMove),
         f"`{query.StudyRootQueryRetrieveInformationModelMove}` (a temporary Storage SCP on 127.0.0.1 "
         "with the calling AE title receives the sub-operations)"],
    ]) + "\n")

    s.append("### 4.3 Network Interfaces\n")
    s.append("TCP/IP (IPv4), DICOM Upper Layer (PS3.8); TCP_NODELAY on every association. The listener binds "
             f"`[listener] host` (default `{listener.host}`, loopback) and port `[listener] port` "
             f"(default {listener.port}).\n")
    s.append("### 4.4 Configuration\n")
    s.append("AE title, port, allow-list, PDU, limits and timeouts: `[listener]` in the site TOML (defaults "
             "in `cxr_ai/defaults.toml`); destinations: `[[routing.destinations]]` (host, port, AE title, "
             "calling AE, TLS per destination).\n")

    s.append("## 5 Media Interchange\n")
    s.append("Not supported (the batch processor reads DICOMDIR and folders as input only; it writes no "
             "DICOM media).\n")

    s.append("## 6 Support of Character Sets\n")
    charsets = sorted({str(o.get("SpecificCharacterSet", "") or "(default repertoire)") for o in outputs})
    s.append("Received instances are stored byte for byte, whatever their Specific Character Set. Result "
             "objects copy the source's Specific Character Set (0008,0005) together with the patient and "
             "study attributes they copy (`cxr_ai/dicom/headers.py`); every text cxr-ai writes itself "
             "(descriptions, labels, burned-in text) is plain ASCII, valid in any of them. "
             f"Observed on a source with the default repertoire: {', '.join(charsets)}.\n")

    s.append("## 7 Security\n")
    s.append(_table(["Feature", "Support", "Configuration"], [
        ["TLS (PS3.15 B.9 Basic TLS Secure Transport Connection Profile)", "Yes, TLS 1.2 minimum, listener and "
         "each DICOM destination", "`[listener] tls, tls_cert, tls_key, tls_ca`; destination `tls*` keys"],
        ["Mutual TLS (client certificates)", "Optional on the listener", "`[listener] tls_require_client_cert`"],
        ["AE title filtering", "Calling AE allow-list and called AE check (4.2.3)", "`[listener]`"],
        ["Audit", "JSON-lines logs; no PHI in logs by default", "`--log-json`"],
    ]) + "\n")

    s.append("## 8 Annexes\n")
    s.append("### 8.1 IOD contents of the created objects\n")
    s.append(_table(["Object", "What it holds"], [
        ["Comprehensive 3D SR", "TID 1500 Measurement Report, title DCM 126000; device observer = the model "
         "(device UID); one TID 1501 group per finding: tracking UID, TID 4019 algorithm identification "
         "(name, version, threshold parameter), finding type, finding site, qualitative evaluation "
         f"{codes.PRESENT.meaning}/{codes.ABSENT.meaning}, probability (DCM {codes.PROBABILITY.value}), "
         f"source image reference. Series number {SR_SERIES_NUMBER}. Preliminary, unverified."],
        ["Secondary Capture (RGB)", "The radiograph as displayed with the finding's Grad-CAM map blended over "
         "it and a burned-in text band (finding, probability shown as `> 0.99` / `< 0.01` at the ends, "
         f"threshold, not-for-diagnostic-use). Series number {SC_SERIES_NUMBER}. Burned In Annotation YES."],
        ["Parametric Map", f"The Grad-CAM map in the source geometry, 0-1 as 16-bit with a Real World Value "
         f"Mapping (quantity DCM {codes.SALIENCY.value} {codes.SALIENCY.meaning}), one instance per finding. "
         f"Series number {PM_SERIES_NUMBER}. Frame of Reference: its own (a projection radiograph has none); "
         "see the README for what viewers do with it."],
        ["Segmentation (opt-in)", "The same map as a FRACTIONAL (PROBABILITY, 0-255) Segmentation without a "
         "Frame of Reference, one frame on the source frame, one segment per finding (segmented property = the "
         f"finding's concept, algorithm AUTOMATIC). Series number {SEG_SERIES_NUMBER}."],
    ]) + "\n")
    s.append(f"Heatmap objects are made for `[outputs] heatmaps_for` = {' or '.join(repr(v) for v in HEATMAPS_FOR)} "
             f"findings (default {out_cfg.get('heatmaps_for', 'positive')!r}); the SR reports every finding. "
             "All result objects of a study share its patient and study attributes; each object kind has one "
             "series per study and model, whose series-level attributes are identical in every instance. The "
             "Contributing Equipment Sequence names the algorithm first (purpose "
             f"{codes.PROCESSING_EQUIPMENT.meaning}, DCM {codes.PROCESSING_EQUIPMENT.value}; manufacturer, model "
             "name = bundle name, software version = bundle version, Device UID = the model's device UID, which "
             "changes with its weights).\n")
    s.append("### 8.2 Coded terminology\n")
    s.append(_table(["Concept", "Code", "Scheme"], [
        [c.meaning, f"`{c.value}`", c.scheme_designator] for c in (
            codes.CARDIOMEGALY, codes.LV_SYSTOLIC_DYSFUNCTION, codes.PRESENT, codes.ABSENT, codes.HEART,
            codes.PROBABILITY, codes.PLAIN_XRAY_CHEST, codes.ARTIFICIAL_INTELLIGENCE, codes.SALIENCY,
            codes.OBSERVER_TYPE_DEVICE, codes.PROCESSING_EQUIPMENT)
    ]) + "\n")
    return "\n".join(s).rstrip() + "\n"


def _unique_objects(objects: list[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for o in objects:
        seen.setdefault(str(o.SOPClassUID), o)
    return sorted(seen.values(), key=lambda o: _uid_name(str(o.SOPClassUID)))


def _unique_classes(objects: list[Any]) -> list[Any]:
    return _unique_objects(objects)
