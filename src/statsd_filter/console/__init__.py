"""Commands that watch a running proxy through its admin port: ``top`` and ``tap --from``."""
