"""The triage worklist (``/``, ``/worklist``): the ranked rows, their filters, and the
version the page polls to fetch new rows without a reload."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cxr_ai.service.web.context import WebContext
from cxr_ai.service.web.data import STATES, Filters, all_rows, filter_rows, finding_keys, page_of


def _page(request: Request) -> int:
    try:
        return int(request.query_params.get("page", "1"))
    except ValueError:
        return 1


def version(ctx: WebContext) -> str:
    """Changes whenever a worklist row or a study count changes."""
    n, t = ctx.worklist.last_change()
    counts = ctx.store.counts()["studies"]
    return f"{n}:{t:.6f}:" + ",".join(str(counts[k]) for k in sorted(counts))


def rows_context(ctx: WebContext, request: Request) -> dict[str, Any]:
    filters = Filters.from_mapping(request.session.get("filters"))
    every, at_version = ctx.rows.get(version(ctx), lambda: all_rows(ctx.worklist, ctx.store))
    rows = filter_rows(every, filters)
    page_rows, page, pages = page_of(rows, page=_page(request), size=ctx.settings.page_size)
    return {"rows": page_rows, "page": page, "pages": pages, "total": len(rows), "filters": filters,
            "version": at_version,
            "cap_minutes": ctx.worklist.policy.ageing_cap_minutes}


async def worklist_page(request: Request) -> Response:
    pages = request.app.state.pages
    user = pages.require_user(request)
    return pages.render(request, "worklist.html", user=user, states=STATES,
                        findings=finding_keys(pages.ctx.worklist), **rows_context(pages.ctx, request))


async def worklist_rows_fragment(request: Request) -> Response:
    pages = request.app.state.pages
    pages.require_user(request)
    return pages.render(request, "_rows.html", **rows_context(pages.ctx, request))


async def worklist_version(request: Request) -> Response:
    pages = request.app.state.pages
    pages.require_user(request)
    return JSONResponse({"version": version(pages.ctx)})


async def set_filters(request: Request) -> Response:
    pages = request.app.state.pages
    pages.require_user(request)
    form = await pages.check_csrf(request)
    request.session["filters"] = {} if "clear" in form else Filters.from_mapping(form).to_dict()
    return RedirectResponse("/", status_code=303)


def routes() -> list[BaseRoute]:
    return [Route("/", worklist_page), Route("/worklist", worklist_page),
            Route("/worklist/rows", worklist_rows_fragment), Route("/api/worklist/version", worklist_version),
            Route("/filters", set_filters, methods=["POST"])]
