"""The broker server: HTTP + WebSocket front, commands, auth, delivery, CLI."""

__version__ = "0.1.0"
