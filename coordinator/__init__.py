"""Reference coordinator: drives site agents over HTTP only."""
