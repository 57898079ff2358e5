"""The hash-chained audit log: its tables, verify and export, and the `AuditSink` protocol that
everything else records through."""
