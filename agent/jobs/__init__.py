"""Round jobs: their states, their rows, the scheduler in the API process and the worker process.

`states` (what a job may be and become), `models` (the table), `store` (rows, moves and
snapshots), `redact` (errors fit to leave the site), `runner` (the scheduler, API side),
`launch` (how worker processes start), `worker` (the worker process), `forkserver`.
Nothing is imported here, so that the API side never loads the worker's libraries.
"""
