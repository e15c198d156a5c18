"""Tasks: the registry of known tasks, their sources (BIG-bench JSON, user JSONL, synthetic) and splits."""
