"""A 3-node nats-server cluster on loopback ports, JetStream on every node (own store dir,
own `server_name`), routes between all of them — for the cluster test and by hand:

    with NatsCluster(tmp_path) as cluster:
        cluster.urls            # ["nats://127.0.0.1:p1", ...]
        cluster.kill(0)         # SIGKILL node 0
        cluster.start_node(0)   # back, same ports and store dir
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import nats

from ccbridge.embedded_nats import free_port, nats_server_binary, reap


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    store_dir: Path
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class NatsCluster:
    def __init__(self, base_dir: Path, *, size: int = 3, name: str = "ccbridge-test") -> None:
        self.base_dir = Path(base_dir)
        self.name = name
        self.nodes: list[Node] = []
        for i in range(size):
            node_dir = self.base_dir / f"n{i}"
            self.nodes.append(
                Node(f"n{i}", free_port(), free_port(), node_dir / "jetstream", node_dir / "nats.conf",
                     node_dir / "nats-server.log")
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def write_config(self, node: Node) -> None:
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        node.store_dir.mkdir(parents=True, exist_ok=True)
        node.config.write_text(
            f"""server_name: {node.name}
listen: 127.0.0.1:{node.port}
jetstream {{
  store_dir: "{node.store_dir}"
  max_memory_store: 64MB
  max_file_store: 2GB
}}
cluster {{
  name: {self.name}
  listen: 127.0.0.1:{node.cluster_port}
  routes: [{routes}]
}}
"""
        )

    def start_node(self, index: int, timeout: float = 15.0) -> None:
        node = self.nodes[index]
        self.write_config(node)
        out = open(node.log, "ab")
        node.process = subprocess.Popen([nats_server_binary(), "-c", str(node.config)], stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited: {node.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", node.port), timeout=0.2) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {node.name} did not start")

    def start(self) -> NatsCluster:
        for i in range(len(self.nodes)):
            self.start_node(i)
        return self

    async def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until the JetStream meta group has a leader (an R3 stream can be created)."""
        nc = await nats.connect(self.urls, max_reconnect_attempts=-1)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.25)
        finally:
            await nc.close()

    def kill(self, index: int) -> None:
        node = self.nodes[index]
        if node.process and node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        node.process = None

    def stop(self) -> None:
        for node in self.nodes:  # every node told first, so they shut down together
            if node.process and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process:
                reap(node.process)
                node.process = None

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
