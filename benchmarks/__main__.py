"""``python -m benchmarks ...`` is ``ctscreen bench ...``."""

from benchmarks.cli import main

raise SystemExit(main())
