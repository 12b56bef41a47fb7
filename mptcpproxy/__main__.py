from mptcpproxy.cli import main

raise SystemExit(main())
