"""jsoncache: a caching reverse proxy for JSON APIs, backed by Redis."""

__version__ = "0.1.0"
