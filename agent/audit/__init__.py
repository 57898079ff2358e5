"""The audit database: SQLAlchemy models, the hash-chained audit log, migrations."""
