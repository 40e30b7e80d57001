"""The parent process: binds sockets, forks and restarts workers, reloads the config,
and serves the admin endpoint. Nothing here reads StatsD traffic."""
