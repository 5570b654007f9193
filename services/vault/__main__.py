"""`python -m services.vault` runs the vault service."""

from services.vault.app import main

main()
