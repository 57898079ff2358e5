"""The REST control API (FastAPI): auth, routes, schemas."""
