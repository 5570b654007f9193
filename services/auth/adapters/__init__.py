"""Adapters of the auth service: OAuth token endpoint (httpx), pending-login store (NATS KV),
keys (vault public key, caller-JWT secret) and the event publisher (FastStream)."""
