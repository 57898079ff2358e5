"""Outbound-only mode: the agent reaches the coordinator's relay, never the other way round.

Hospital firewalls allow outbound connections only. The connector (`agent.connect.connector`)
registers with the relay, long-polls it for tasks, renews their leases by heartbeats, runs each
task through the same `SiteService` methods as the push API (approval, validation, worker,
egress gate, audit), and uploads the released update in resumable chunks
(`agent.connect.transfer`). `agent.connect.models` keeps what it was doing across restarts.
It sits at the API's level: it drives the service, as the routers do, and nothing below imports it.
"""
