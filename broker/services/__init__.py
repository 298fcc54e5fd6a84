"""Application services: identity, messaging, licensing, updates, operators, the log's window."""
