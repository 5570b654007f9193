"""Sandbox service: injects a person's Claude Code credentials into every sandbox the
platform creates for them (`sandbox.created` → files in the sandbox home →
`sandbox.credentials.injected` | `sandbox.credentials.failed`)."""
