"""Data: read into the canonical schema (ingest), check it (validation), tokenize and split it (formatting)."""
