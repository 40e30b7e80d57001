"""Only the optional C accelerator lives here; everything else is in pyproject.toml."""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    # Optional: without a compiler the package still installs and uses a
    # pure-Python fallback (statsd_filter.fastio). The test script sets
    # STATSD_FILTER_REQUIRE_ACCELERATOR=1 where a compiler exists, so a
    # _fastio.c that no longer compiles fails the install instead.
    required = os.environ.get("STATSD_FILTER_REQUIRE_ACCELERATOR") == "1"
    ext_modules.append(
        Extension(
            "statsd_filter._fastio",
            ["csrc/_fastio.c"],
            # _fastio.c includes these parts into one translation unit.
            depends=sorted(str(p) for p in Path("csrc/fastio").glob("*.c")),
            optional=not required,
        )
    )

setup(ext_modules=ext_modules)
