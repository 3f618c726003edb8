"""`python -m arpg.engine.profile --one SPEC --out RESULT`: the child process of `arpg profile`."""

from arpg.engine.profile.child import main

raise SystemExit(main())
