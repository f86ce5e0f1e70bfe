"""The listener as a place: settings and wiring, workers, delivery and routing, metrics, CLI.

- :mod:`~cxr_ai.service.settings`: one pydantic model per section (``[listener]``,
  ``[store]``, ``[workers]``, ``[routing]``, ``[http]``) and :func:`validate_config`, which
  checks them once into a :class:`ServiceSettings`.
- :mod:`~cxr_ai.service.wiring`: :class:`Service` (SCP + spool + job store + workers + router +
  HTTP side wired together), :func:`run_service`.
- :mod:`~cxr_ai.service.workers`: the worker pool that turns spooled studies into results by
  calling the pipeline (:mod:`cxr_ai.pipeline`).
- :mod:`~cxr_ai.service.routing`: destinations (DICOM, STOW-RS, FHIR, folder) and the outbox
  router with its retries.
- :mod:`~cxr_ai.service.metrics`: the service's Prometheus metrics.
- :mod:`~cxr_ai.service.cli`: ``cxr-ai serve``, ``jobs``, ``demo``; ``python -m cxr_ai.service``.
- The HTTP side (pages, API) is :mod:`cxr_ai.service.web`, started by :class:`Service`.

The names of :mod:`~cxr_ai.service.wiring` are available here (``from cxr_ai.service import
Service``); they load on first use, so that importing :mod:`cxr_ai.service.metrics` (as the DICOM
listener does) does not load the whole service.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cxr_ai.service.wiring import (
        MSG_SECTION_TYPE,
        MSG_BAD_PIPELINE,
        MSG_AE_TITLE,
        PipelineFactory,
        STOP_TAIL_SECONDS,
        SWEEP_SECONDS,
        ServiceSettings,
        validate_config,
        import_factory,
        Service,
        JsonLogFormatter,
        configure_logging,
        SHUTDOWN_MIN_SECONDS,
        run_service,
    )

__all__ = [
    "MSG_SECTION_TYPE",
    "MSG_BAD_PIPELINE",
    "MSG_AE_TITLE",
    "PipelineFactory",
    "STOP_TAIL_SECONDS",
    "SWEEP_SECONDS",
    "ServiceSettings",
    "validate_config",
    "import_factory",
    "Service",
    "JsonLogFormatter",
    "configure_logging",
    "SHUTDOWN_MIN_SECONDS",
    "run_service",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("cxr_ai.service.wiring"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
