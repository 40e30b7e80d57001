"""Only the optional C accelerator lives here; everything else is in pyproject.toml."""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    # optional=True: without a compiler the package still installs and uses a
    # pure-Python fallback (statsd_filter.fastio).
    ext_modules.append(
        Extension("statsd_filter._fastio", ["src/statsd_filter/_fastio.c"], optional=True)
    )

setup(ext_modules=ext_modules)
