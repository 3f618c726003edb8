from arpg.cli import main

raise SystemExit(main())
