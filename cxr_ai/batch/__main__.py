"""``python -m cxr_ai.batch``: see :func:`cxr_ai.batch.cli.batch_main`."""

from cxr_ai.batch.cli import batch_main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(batch_main())
