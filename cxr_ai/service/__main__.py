"""``python -m cxr_ai.service``, as the systemd unit and tests run it: see :func:`cxr_ai.service.cli.serve_main`."""

import sys

from cxr_ai.service.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
