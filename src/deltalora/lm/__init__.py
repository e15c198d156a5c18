"""The base language model: loading (offline, Hub or tiny), batching and scoring of task items."""
