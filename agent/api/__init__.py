"""The REST control API (FastAPI): auth, one router per resource, schemas, middleware, metrics."""
