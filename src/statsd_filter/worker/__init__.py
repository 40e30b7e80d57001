"""A worker process: UDP and TCP inputs feeding one pipeline (rules, router, senders)."""
