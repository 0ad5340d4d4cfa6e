from etagproxy.cli import main

raise SystemExit(main())
