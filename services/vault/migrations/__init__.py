"""Alembic migrations of the vault (a package so non-editable installs ship them)."""
