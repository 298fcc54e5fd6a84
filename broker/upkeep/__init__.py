"""The log's upkeep: snapshots and compaction."""
