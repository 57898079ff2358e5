"""The agent's database: declarative base, engine and sessions (SQLite WAL, PostgreSQL), migrations."""
