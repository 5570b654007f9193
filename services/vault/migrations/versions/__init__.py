"""Alembic revisions of the vault."""
