"""The WebSocket fronts: node sessions and the operators' feed."""
