from cxr_ai.cli import main

raise SystemExit(main())
