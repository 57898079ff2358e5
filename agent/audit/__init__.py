"""The hash-chained audit log: its tables, verify and export, and the `AuditSink` protocol everything else records through."""
