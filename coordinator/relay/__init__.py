"""The relay: the coordinator's side of outbound-only mode.

A pull-mode site never accepts a connection: it connects to the relay, registers, long-polls
for tasks, fetches the global weights by hash, renews its leases with heartbeats and uploads
its update in chunks named by their SHA-256, then commits them. The coordinator's runner talks
to such a site through `RelaySiteClient` (client.py), a drop-in for the HTTP `AgentClient`
that queues tasks in the relay's store instead of posting them.

- models.py: the relay's tables (its own declarative base; the agent's database is not used)
- store.py: `RelayStore`, the queue, leases, blobs, chunks and the relay's event log
- app.py: `create_relay_app`, the `/v1/relay/...` HTTP protocol
- server.py: `RelayServer` (uvicorn in a thread) and the standalone relay
- client.py: `RelaySiteClient` and `site_clients`, the runner's factory for both kinds of site
"""
