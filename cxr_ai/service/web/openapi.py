"""The OpenAPI 3 document of the JSON API (served at ``/api/v1/openapi.json``), kept by hand
beside the handlers in :mod:`cxr_ai.service.web.second_opinion_page` (the tests validate it with
``openapi-spec-validator`` and check the live answers against its schemas)."""

from __future__ import annotations

from typing import Any

from cxr_ai import __version__

_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string", "description": "What was wrong and what to do"},
                         "reason": {"type": "string", "description": "A stable code (empty, too_large, not_image, "
                                    "truncated, image_size, multi_frame, colour, ...)"}}}

_FINDING = {"type": "object", "required": ["key", "probability", "threshold", "positive"],
            "properties": {"key": {"type": "string"}, "display": {"type": "string"},
                           "probability": {"type": "number", "minimum": 0, "maximum": 1},
                           "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                           "positive": {"type": "boolean", "description": "probability >= threshold"},
                           "probability_text": {"type": "string", "description": "as people read it ('> 0.99')"},
                           "threshold_text": {"type": "string"}},
            "additionalProperties": True}

_ANSWER = {
    "type": "object",
    "required": ["filename", "kind", "accepted", "reason", "message", "applicability_verified", "applicability",
                 "findings", "model", "links", "assumptions"],
    "properties": {
        "filename": {"type": "string"},
        "kind": {"type": "string", "enum": ["dicom", "png", "jpeg"]},
        "accepted": {"type": "boolean", "description": "false: the DICOM gate refused the image (see message)"},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "applicability_verified": {"type": "boolean",
                                   "description": "false for PNG/JPEG: no DICOM header for the gate to check"},
        "applicability": {"type": "string"},
        "assumptions": {"type": "array", "items": {"type": "string"}},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                   "not_for_clinical_use": {"type": "boolean"},
                                                   "intended_use": {"type": "string"}}},
        "findings": {"type": "array", "items": {"$ref": "#/components/schemas/Finding"}},
        "links": {"type": "object", "required": ["image", "overlays", "objects"], "properties": {
            "image": {"type": ["string", "null"], "description": "the image as the model saw it (PNG)"},
            "overlays": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "finding key -> URL of the heatmap overlay PNG"},
            "objects": {"type": "array", "items": {"type": "object", "required": ["name", "kind", "url"], "properties": {
                "name": {"type": "string"}, "kind": {"type": "string", "description": "SR, SC, PM or FHIR Bundle"},
                "url": {"type": "string"}}}}}},
        "expires_in_seconds": {"type": "number", "description": "how long the links stay valid"},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
    },
    "additionalProperties": True,
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``POST /api/v1/second-opinion`` and its helpers."""
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cxr-ai web API", "version": __version__,
                 "description": "A second opinion on one chest radiograph. Not for clinical use unless the model "
                                "bundle says otherwise. Requests are authenticated by the session cookie (sign in "
                                "at /signin) or by the trusted reverse proxy's user header; on a loopback server "
                                "with no users the API is open to the workstation. Every POST sends the "
                                "X-CSRF-Token header: with a session, its token from GET /api/v1/csrf."},
        "paths": {
            "/api/v1/second-opinion": {"post": {
                "operationId": "secondOpinion",
                "summary": "The model's reading of one uploaded DICOM, PNG or JPEG file",
                "description": "The upload is not kept and never enters the worklist, the prediction log or the "
                               "outbox. Download links are opaque, for the same user, and expire.",
                "parameters": [{"name": "X-CSRF-Token", "in": "header", "required": True,
                                "schema": {"type": "string"},
                                "description": "The session's CSRF token (GET /api/v1/csrf); any value without a session"}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary",
                                            "description": "DICOM, PNG or JPEG; at most [web] max_upload_mb"}}}}}},
                "responses": {
                    "200": {"description": "Findings, overlay and result objects",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}},
                    "400": {"description": "Empty, truncated or undecodable file, or no file", **err},
                    "401": {"description": "Sign-in needed", **err},
                    "403": {"description": "X-CSRF-Token missing or wrong", **err},
                    "413": {"description": "Over the size limit, or too many pixels claimed", **err},
                    "415": {"description": "Not a DICOM, PNG or JPEG image", **err},
                    "422": {"description": "A DICOM the gate refused (answer with accepted=false and the reason), "
                                           "or an image that cannot be read as one grayscale radiograph "
                                           "(several frames, colour)",
                            "content": {"application/json": {"schema": {"oneOf": [
                                {"$ref": "#/components/schemas/Answer"}, {"$ref": "#/components/schemas/Error"}]}}}},
                    "429": {"description": "Over [web] second_opinion_per_minute for this user", **err},
                },
            }},
            "/api/v1/csrf": {"get": {
                "operationId": "csrfToken", "summary": "The session's CSRF token",
                "responses": {"200": {"description": "The token and the header to send it in", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["csrf_token", "header"],
                                                    "properties": {"csrf_token": {"type": "string"},
                                                                   "header": {"type": "string"}}}}}},
                              "401": {"description": "Sign-in needed", **err}}}},
            "/second-opinion/download/{ident}": {"get": {
                "operationId": "download", "summary": "One file of an answer (while it is held)",
                "parameters": [{"name": "ident", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The file", "content": {
                    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
                    "application/fhir+json": {"schema": {"type": "object"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                    "404": {"description": "Expired or unknown", **err}}}},
        },
        "components": {"schemas": {"Answer": _ANSWER, "Finding": _FINDING, "Error": _ERROR}},
    }
