from ctxsync.cli import main

raise SystemExit(main())
