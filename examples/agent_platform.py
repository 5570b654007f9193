"""A minimal "agent platform" that uses ccbridge: create a sandbox, ask ccbridge to prepare it
for the user, then run Claude Code in it.

    python examples/agent_platform.py --user alice                     # local sandbox
    python examples/agent_platform.py --user alice --backend e2b       # real E2B (E2B_API_KEY)

Environment: NATS_URL (the bus ccbridge listens on), CCBRIDGE_AUTH_URL (ccbridge's auth service,
which grants each sandbox), CCBRIDGE_TOKEN (the person's caller token: your platform mints it),
LOCAL_SANDBOX_ROOT (local backend), E2B_API_KEY / E2B_TEMPLATE (e2b backend), CLAUDE_BIN (local
backend's claude binary).
`claude -p` only runs with --run-claude: it needs a real Claude account and network access to
Anthropic, which a demo or CI machine does not have.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from ccbridge.client import CcbridgeClient, request_grant
from shared.events import SandboxCredentialsInjected

PROMPT = "Say hello from inside the sandbox in one short sentence."


async def prepare(nats_url: str, auth_url: str, caller_token: str, sandbox_id: str, user: str, backend: str,
                  mode: str) -> SandboxCredentialsInjected:
    # --- the integration: these lines are all a platform needs ---------------------
    # 1. the person grants this one sandbox (their caller token; the lease lasts a day by default)
    grant = await request_grant(auth_url, caller_token, sandbox_id, mode=mode)  # type: ignore[arg-type]
    # 2. ccbridge prepares it
    async with CcbridgeClient(nats_url) as ccb:
        result = await ccb.prepare_sandbox(sandbox_id, user, backend=backend, mode=mode, grant=grant.token,
                                           timeout=60)  # type: ignore[arg-type]
    if not isinstance(result, SandboxCredentialsInjected):
        raise SystemExit(f"ccbridge could not prepare {sandbox_id}: {result.reason} ({result.detail})")
    return result
    # --------------------------------------------------------------------------------


def run_local(home: Path, run_claude: bool) -> int:
    claude = os.environ.get("CLAUDE_BIN") or shutil.which("claude")
    if not claude:
        print("claude is not installed here: npm install -g @anthropic-ai/claude-code")
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_", "ANTHROPIC_"))}
    env.update(HOME=str(home), DISABLE_AUTOUPDATER="1")
    status = subprocess.run([claude, "auth", "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    print(f"claude auth status: {status.stdout.strip()}")
    if not json.loads(status.stdout or "{}").get("loggedIn"):
        return 1
    if not run_claude:
        print("skipped `claude -p`: pass --run-claude when a real Claude account is connected")
        return 0
    done = subprocess.run([claude, "-p", PROMPT], env=env, cwd=home, timeout=300)
    return done.returncode


async def run_e2b(sandbox_id: str, run_claude: bool) -> int:
    from e2b import AsyncSandbox

    sandbox = await AsyncSandbox.connect(sandbox_id)
    status = await sandbox.commands.run("claude auth status --json", user="user")
    print(f"claude auth status: {status.stdout.strip()}")
    if not run_claude:
        print("skipped `claude -p`: pass --run-claude when a real Claude account is connected")
        return 0
    result = await sandbox.commands.run(f"claude -p {json.dumps(PROMPT)}", user="user", timeout=300)
    print(result.stdout)
    return result.exit_code


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", required=True)
    parser.add_argument("--backend", choices=["local", "e2b"], default="local")
    parser.add_argument("--mode", choices=["file", "access_only", "env"], default="access_only")
    parser.add_argument("--run-claude", action="store_true")
    args = parser.parse_args()
    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    auth_url = os.environ.get("CCBRIDGE_AUTH_URL", "http://127.0.0.1:8000")
    caller_token = os.environ.get("CCBRIDGE_TOKEN")
    if not caller_token:
        raise SystemExit("set CCBRIDGE_TOKEN to the person's caller token (dev stack: ccbridge token --user <id>)")

    if args.backend == "e2b":
        from e2b import AsyncSandbox

        sandbox = await AsyncSandbox.create(template=os.environ.get("E2B_TEMPLATE", "claude-code"))
        sandbox_id = sandbox.sandbox_id
    else:
        sandbox_id = f"agent-{uuid.uuid4().hex[:8]}"
    print(f"sandbox {sandbox_id} created ({args.backend}); asking ccbridge to prepare it for {args.user} …")
    result = await prepare(nats_url, auth_url, caller_token, sandbox_id, args.user, args.backend, args.mode)
    print(f"ready: {result.mode} credentials, access valid until {result.expires_at} ms; files: {result.files}")
    if args.backend == "e2b":
        return await run_e2b(sandbox_id, args.run_claude)
    home = Path(os.environ.get("LOCAL_SANDBOX_ROOT", "./var/sandboxes")) / sandbox_id
    return run_local(home, args.run_claude)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
