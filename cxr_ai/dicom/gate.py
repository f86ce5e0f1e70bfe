"""The applicability gate: may the chest models read this image?

The rules are data (the ``[gate]`` section of the configuration); this module only applies
them, in a fixed order, and returns a :class:`GateDecision` with a machine-readable reason
and a sentence a PACS administrator can act on. Metadata rules run before any pixel is
decoded, so wrong images are rejected cheaply.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cxr_ai.config import default_config
from cxr_ai.dicom.reader import Radiograph, Source, read_radiograph
from cxr_ai.errors import ConfigError, ReadError

logger = logging.getLogger(__name__)


class GateReason(str, enum.Enum):
    """Why an image was accepted or rejected (stable strings: they go into job records)."""

    ACCEPTED = "accepted"
    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    MISSING_UID = "missing_uid"
    INVALID_UID = "invalid_uid"
    NO_PIXEL_DATA = "no_pixel_data"
    MODALITY = "modality"
    SOP_CLASS = "sop_class"
    BODY_PART = "body_part"
    VIEW = "view"
    NOT_GRAYSCALE = "not_grayscale"
    MULTI_FRAME = "multi_frame"
    IMAGE_SIZE = "image_size"
    DECODE_FAILED = "decode_failed"
    BLANK_IMAGE = "blank_image"


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the applicability check."""

    accepted: bool
    reason: GateReason
    message: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason.value,
            "message": self.message,
            "warnings": list(self.warnings),
        }


def _norm(value: str) -> str:
    return re.sub(r"[\s_]+", " ", value.strip().upper())


def _upper_words(values: Iterable[str]) -> frozenset[str]:
    return frozenset(str(v).strip().upper() for v in values)


@dataclass(frozen=True)
class GateRules:
    """The ``[gate]`` configuration section, validated."""

    modalities: frozenset[str]
    sop_classes: frozenset[str]
    chest_words: frozenset[str]
    body_part_qualifiers: frozenset[str]
    body_part_placeholders: frozenset[str]
    non_chest_words: frozenset[str]
    frontal_views: frozenset[str]
    rejected_views: frozenset[str]
    lateral_words: frozenset[str]
    accept_unknown_view: bool
    photometric: frozenset[str]
    min_side: int
    max_side: int
    max_aspect_ratio: float
    max_frames: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> "GateRules":
        """Build from a full config (``config['gate']``) or the embedded defaults."""
        section = (config if config is not None else default_config()).get("gate")
        if not isinstance(section, Mapping):
            raise ConfigError("configuration has no [gate] section")
        try:
            rules = cls(
                modalities=frozenset(_norm(v) for v in section["modalities"]),
                sop_classes=frozenset(str(v) for v in section["sop_classes"]),
                chest_words=_upper_words(section["chest_words"]),
                body_part_qualifiers=_upper_words(section["body_part_qualifiers"]),
                body_part_placeholders=_upper_words(section["body_part_placeholders"]),
                non_chest_words=_upper_words(section["non_chest_words"]),
                frontal_views=frozenset(_norm(v) for v in section["frontal_views"]),
                rejected_views=frozenset(_norm(v) for v in section["rejected_views"]),
                lateral_words=_upper_words(section["lateral_words"]),
                accept_unknown_view=bool(section["accept_unknown_view"]),
                photometric=frozenset(_norm(v) for v in section["photometric"]),
                min_side=int(section["min_side"]),
                max_side=int(section["max_side"]),
                max_aspect_ratio=float(section["max_aspect_ratio"]),
                max_frames=int(section["max_frames"]),
            )
        except KeyError as exc:
            raise ConfigError(f"[gate] section lacks the key {exc.args[0]!r}") from exc
        if not 0 < rules.min_side <= rules.max_side:
            raise ConfigError("[gate] needs 0 < min_side <= max_side")
        if not rules.chest_words:
            raise ConfigError("[gate] chest_words is empty: no image could ever be a chest")
        for name in ("body_part_qualifiers", "body_part_placeholders", "non_chest_words", "lateral_words"):
            overlap = sorted(rules.chest_words & getattr(rules, name))
            if overlap:
                raise ConfigError(f"[gate] {', '.join(overlap)} cannot be both in chest_words and in {name}")
        return rules

    @functools.cached_property
    def vocabulary(self) -> frozenset[str]:
        """Every word the body-part rule knows (for splitting words run together)."""
        return (self.chest_words | self.body_part_qualifiers | self.body_part_placeholders
                | self.non_chest_words | self.lateral_words)


_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def _split_known(token: str, vocabulary: frozenset[str]) -> list[str] | None:
    """``token`` as a run of known words (fewest pieces), e.g. PORTCHEST -> [PORT, CHEST];
    None when it cannot be split so."""
    n = len(token)
    best: list[list[str] | None] = [None] * (n + 1)
    best[0] = []
    for end in range(1, n + 1):
        for start in range(end):
            head = best[start]
            piece = token[start:end]
            if head is not None and piece in vocabulary and (best[end] is None or len(head) + 1 < len(best[end] or ())):
                best[end] = [*head, piece]
    return best[n]


#: A Code String (BodyPartExamined) holds at most 16 characters (PS3.5 6.2); vendors cut longer
#: names there ("AP PORTABLE CHE").
CS_MAX_LENGTH = 16


def header_words(text: str, rules: GateRules, *, code_string: bool = False) -> list[str]:
    """The upper-case words of a free-text header value; a word that is a run of known words
    (CHESTPA, PORTCHEST) is replaced by them. With ``code_string``, a last word cut short at the
    16-character limit is completed when the known words starting with it all extend one of them."""
    tokens = _WORD.findall((text or "").upper())
    out: list[str] = []
    for i, token in enumerate(tokens):
        pieces = None if token in rules.vocabulary else _split_known(token, rules.vocabulary)
        if (pieces is None and code_string and i == len(tokens) - 1 and len(token) >= 3
                and len(text.rstrip()) >= CS_MAX_LENGTH - 1 and text.upper().rstrip().endswith(token)):
            completions = sorted((w for w in rules.vocabulary if w.startswith(token)), key=len)
            if completions and all(w.startswith(completions[0]) for w in completions):
                pieces = completions[:1]  # CHE -> CHEST (not CHESTABDOMEN: nothing says more)
        out.extend(pieces or [token])
    return out


#: Why an image is refused, and the message (without the source's name).
_Refusal = tuple[GateReason, str]


def check_radiograph(rg: Radiograph, rules: GateRules | None = None) -> GateDecision:
    """Apply the rules to an already-read :class:`Radiograph` (metadata only; no decoding).

    The checks run in order, and the first refusal is the answer: modality and SOP class,
    body part, view, then the image itself (grayscale, one frame, pixel data, size)."""
    rules = rules or _default_rules()
    warnings = list(rg.warnings)
    refusal = _check_modality(rg, rules)
    if refusal is None:
        described = {w for text in (rg.study_description, rg.series_description, rg.protocol_name)
                     for w in header_words(text, rules)}
        words = _body_part_words(rg, rules, warnings)
        refusal = (_check_body_part(rg, rules, words=words, described=described)
                   or _check_view(rg, rules, words=words, described=described, warnings=warnings)
                   or _check_image(rg, rules))
    if refusal is not None:
        reason, message = refusal
        return GateDecision(False, reason, f"{rg.source}: {message}", tuple(warnings))
    return GateDecision(True, GateReason.ACCEPTED, f"{rg.source}: frontal chest {rg.modality} accepted.",
                        tuple(warnings))


def _check_modality(rg: Radiograph, rules: GateRules) -> _Refusal | None:
    if rg.modality not in rules.modalities:
        return (
            GateReason.MODALITY,
            f"modality {rg.modality or '(empty)'} is not a radiograph the chest models read "
            f"(accepted: {', '.join(sorted(rules.modalities))}); route only chest CR/DX here.",
        )
    if rg.sop_class_uid not in rules.sop_classes:
        return (
            GateReason.SOP_CLASS,
            f"SOP class {rg.sop_class_uid} is not accepted for {rg.modality} (accepted: CR Image "
            "Storage, DX Image Storage - For Presentation); send the For Presentation image.",
        )
    return None


def _body_part_words(rg: Radiograph, rules: GateRules, warnings: list[str]) -> list[str]:
    """The words of BodyPartExamined; none when they are only placeholders (with a warning)."""
    words = header_words(rg.body_part, rules, code_string=True)
    if all(w in rules.body_part_placeholders for w in words):
        if words:
            warnings.append(f"BodyPartExamined {rg.body_part!r} says nothing; the descriptions decide")
        words = []
    return words


def _check_body_part(rg: Radiograph, rules: GateRules, *, words: list[str], described: set[str]) -> _Refusal | None:
    """BodyPartExamined names the chest (and the series does not name another region); when it
    is empty, the descriptions must say chest and name no other region."""
    if words:
        others = [w for w in words if w not in rules.chest_words
                  and w not in rules.body_part_qualifiers and w not in rules.lateral_words]
        if others or not any(w in rules.chest_words for w in words):
            regions = [w for w in others if w in rules.non_chest_words]
            what = (f"which names {regions[0]}, not the chest" if regions
                    else f"whose word {others[0]!r} is neither a chest word nor a known qualifier" if others
                    else "which does not name the chest")
            return (
                GateReason.BODY_PART,
                f"BodyPartExamined is {rg.body_part!r}, {what}; the models read chest radiographs "
                "only (a real qualifier of chest films can be added to [gate] body_part_qualifiers).",
            )
        series = [w for text in (rg.series_description, rg.protocol_name) for w in header_words(text, rules)
                  if w in rules.non_chest_words]
        if series:
            return (
                GateReason.BODY_PART,
                f"BodyPartExamined says chest but the series description or protocol name names "
                f"{series[0]}; such a series is not a chest radiograph.",
            )
        return None
    regions = sorted(described & rules.non_chest_words)
    if regions:
        return (
            GateReason.BODY_PART,
            f"BodyPartExamined is empty and the descriptions name {regions[0]}, not the chest; "
            "set BodyPartExamined=CHEST on chest images.",
        )
    if not described & rules.chest_words:
        return (
            GateReason.BODY_PART,
            "BodyPartExamined is empty and no study/series description or protocol name says "
            "chest; set BodyPartExamined=CHEST on chest images.",
        )
    return None


def _check_view(rg: Radiograph, rules: GateRules, *, words: list[str], described: set[str],
                warnings: list[str]) -> _Refusal | None:
    """A frontal ViewPosition; when it is empty, no lateral named anywhere (and then assumed
    frontal, with a warning, if the rules allow it)."""
    view = _norm(rg.view_position)
    if view:
        if view in rules.rejected_views or view not in rules.frontal_views:
            return (
                GateReason.VIEW,
                f"ViewPosition is {rg.view_position!r}; only frontal (PA or AP) views are read.",
            )
        return None
    named = [w for w in words if w in rules.lateral_words] or sorted(described & rules.lateral_words)
    if named:
        return (
            GateReason.VIEW,
            f"ViewPosition is empty and BodyPartExamined or the descriptions name a {named[0]} "
            "view; only frontal (PA or AP) views are read.",
        )
    if not rules.accept_unknown_view:
        return GateReason.VIEW, "ViewPosition is empty; set PA or AP on frontal views."
    warnings.append("ViewPosition is empty; assumed frontal")
    return None


def _check_image(rg: Radiograph, rules: GateRules) -> _Refusal | None:
    """One grayscale frame of pixel data, of a size the models read."""
    if rg.samples_per_pixel != 1 or _norm(rg.photometric) not in rules.photometric:
        return (
            GateReason.NOT_GRAYSCALE,
            f"photometric interpretation {rg.photometric or '(empty)'} with "
            f"{rg.samples_per_pixel} samples per pixel is not a grayscale radiograph.",
        )
    if rg.number_of_frames > rules.max_frames:
        return (
            GateReason.MULTI_FRAME,
            f"{rg.number_of_frames} frames; a radiograph has one frame.",
        )
    if not rg.has_pixel_data:
        return GateReason.NO_PIXEL_DATA, "the dataset has no Pixel Data; there is no image to read."
    short, long_ = sorted((rg.rows, rg.columns))
    if short < rules.min_side or long_ > rules.max_side or long_ > rules.max_aspect_ratio * short:
        return (
            GateReason.IMAGE_SIZE,
            f"image is {rg.rows}x{rg.columns} pixels; accepted sides are {rules.min_side}-"
            f"{rules.max_side} with aspect ratio at most {rules.max_aspect_ratio}.",
        )
    return None


def check_applicability(source: Source | Radiograph, rules: GateRules | None = None) -> tuple[GateDecision, Radiograph | None]:
    """Read ``source`` if needed and apply the rules; read errors become rejections.

    Returns the decision and the radiograph (None when the input could not be read).
    """
    if isinstance(source, Radiograph):
        return check_radiograph(source, rules), source
    try:
        rg = read_radiograph(source)
    except ReadError as exc:
        reason = GateReason(exc.reason) if exc.reason in GateReason._value2member_map_ else GateReason.NOT_DICOM
        return GateDecision(False, reason, str(exc)), None
    return check_radiograph(rg, rules), rg


@functools.cache
def _default_rules() -> GateRules:
    """The embedded defaults, read once (on first use, not at import)."""
    return GateRules.from_config()


def reasons(decisions: Iterable[GateDecision]) -> dict[str, int]:
    """Count decisions by reason (for summaries)."""
    out: dict[str, int] = {}
    for d in decisions:
        out[d.reason.value] = out.get(d.reason.value, 0) + 1
    return out
