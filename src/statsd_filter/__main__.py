"""Allow ``python -m statsd_filter``."""

from statsd_filter.cli import main

raise SystemExit(main())
