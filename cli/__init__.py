"""Command-line helpers around the pipelines: run summary (python -m cli.summary), scheduling (python -m cli.schedule)."""
