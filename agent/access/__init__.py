"""Who may do what: API tokens, roles and plan approvals, with their tables."""
