"""Optional integrations with other frameworks; each imports its framework on first use."""
