"""fedsite-flower: run fedsite sites under Flower (a SuperLink with one SuperNode per site).

The ClientApp holds no training code: it turns each Flower message into a fedsite plan plus
safetensors weights and submits them to the site's agent over its local API, so that every
round passes the agent's approval policy, worker, egress gate and audit log.

Modules that do not import `flwr` (so the agent's test suite can test them without it):
`arrays` (safetensors <-> numpy, canonical), `agent_api` (the agent's HTTP API), `bridge`
(one train or evaluate job at the agent) and `results` (results.json and the Dice plot).
`client_app` and `server_app` are the Flower side.
"""
