"""Thin asyncio adapters: listeners, the worker process, the admin endpoint, the app."""
