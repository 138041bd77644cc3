"""Serving: a decoded request in, an engine request to its tier, the engine's output back as an
API's answer. Imports `service.tiers`, never `service.jobs` or the controllers."""
