"""The v1 routes, one router per resource: thin adapters from HTTP to `SiteService`.

Each route authenticates first (its caller dependency comes first in its signature), then
reads its input, then calls one service method. Service errors become HTTP codes in
`agent.api.app`, not here. Blocking work (database, weight decoding) runs in the thread
pool, so status polls stay fast while an upload is checked. `agent.api.app` mounts the
routers: all but `metrics` under `/v1`.
"""
