"""The provider's side of the API: ``b2kd serve``'s server, its wire limits, API keys,
quota and replay store (SQLite or PostgreSQL), access log, metrics and statistics.
Nothing here runs on the edge."""
