"""The `broker` command line."""
