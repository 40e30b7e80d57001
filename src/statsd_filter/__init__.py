"""statsd-filter: a multi-core StatsD / DogStatsD filtering proxy."""

__version__ = "0.1.0"
