"""ccbridge's own performance and reliability harness.

`python -m bench` (`make bench`) measures the pipeline against the raw NATS limit and writes
docs/bench/latest.json + latest.png; `python -m bench.chaos` (`make chaos`) kills and restarts
everything under load and checks that nothing is lost or applied twice, then `python -m bench.outages`
(also `make outages`) takes one dependency at a time down for a minute (PostgreSQL, the vault,
OAuth, e2b) and checks that nothing fails or is lost; `python -m bench.soak`
(`make soak`) measures each service's memory growth per 10,000 sandboxes. The same building
blocks (`bench.common`, `bench.cluster`) back the chaos, cluster, bus-fuzz and leak-scan tests.

Nothing here imports a service: services run as real processes (ccbridge.stack.Stack) and are
driven only through the bus, their files and their database, like a platform would.
"""
