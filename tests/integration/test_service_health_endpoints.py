"""Every bus-only service answers /healthz, /readyz and /metrics over HTTP, and its metrics
move with the traffic (and carry no identifiers or secrets)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import nats

from ccbridge.client import CcbridgeClient
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.stack import Stack
from tests.grants import stack_grant


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}" if wanted else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_vault_and_sandbox_serve_health_and_metrics(tmp_path: Path, embedded_nats) -> None:
    token = f"sk-ant-oat01-metrics-{uuid.uuid4().hex}"
    user = f"metrics-{uuid.uuid4().hex[:6]}"
    async with Stack(tmp_path / "data", nats_url=embedded_nats.url, services=("vault", "sandbox")) as stack:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in stack.metrics_ports.items()}
        async with httpx.AsyncClient(timeout=5) as http:
            for url in urls.values():
                assert (await http.get(f"{url}/healthz")).status_code == 200
                assert (await http.get(f"{url}/readyz")).status_code == 200
            before = (await http.get(f"{urls['sandbox']}/metrics")).text

            nc = await nats.connect(stack.nats_url)
            try:
                await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, token)
                async with CcbridgeClient(stack.nats_url, connection=nc) as ccb:
                    for _ in range(50):
                        if (await ccb.connection_status(user)).connected:
                            break
                        await asyncio.sleep(0.1)
                    nobody = f"nobody-{uuid.uuid4().hex[:6]}"
                    await ccb.prepare_sandbox("sbx-metrics-1", user, timeout=20,
                                              grant=await stack_grant(stack, user, "sbx-metrics-1"))
                    await ccb.prepare_sandbox("sbx-metrics-2", nobody, timeout=20,
                                              grant=await stack_grant(stack, nobody, "sbx-metrics-2"))
            finally:
                await nc.close()
            # The result event reaches us a moment before the service counts it: poll briefly.
            for _ in range(50):
                sandbox = (await http.get(f"{urls['sandbox']}/metrics")).text
                if _metric(sandbox, "ccbridge_sandbox_injection_seconds_count") >= 2:
                    break
                await asyncio.sleep(0.1)
            vault = (await http.get(f"{urls['vault']}/metrics")).text
    assert _metric(sandbox, "ccbridge_sandbox_injections_total", outcome="injected") == \
        _metric(before, "ccbridge_sandbox_injections_total", outcome="injected") + 1
    assert _metric(sandbox, "ccbridge_sandbox_failures_total", reason="not_connected") >= 1
    assert _metric(sandbox, "ccbridge_sandbox_injection_seconds_count") >= 2
    assert _metric(sandbox, "ccbridge_sandbox_events_out_total", subject="sandbox.credentials.injected") >= 1
    assert "ccbridge_dlq_messages" in sandbox
    assert _metric(vault, "ccbridge_vault_credential_requests_total", outcome="ok") >= 1
    for text in (sandbox, vault):
        assert token not in text and user not in text and "sbx-metrics" not in text
