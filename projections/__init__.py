"""Read models built by applying events in log order; no I/O, no clock (DESIGN.md §4)."""
