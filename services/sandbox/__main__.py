"""`python -m services.sandbox` runs the sandbox service."""

from services.sandbox.app import main

if __name__ == "__main__":
    main()
