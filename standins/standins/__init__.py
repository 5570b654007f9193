"""Loopback stand-ins for external services (OAuth server, e2b), used by tests and `ccbridge demo`."""
