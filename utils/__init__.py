"""Shared helpers: config loading, data, template cache, metrics, callbacks, safe I/O."""
