"""``python -m ctscreen ...`` is ``ctscreen ...`` (the console script's entry point)."""

from ctscreen.cli import main

raise SystemExit(main())
