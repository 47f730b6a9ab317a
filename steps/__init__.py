"""One ZenML step per file, each a thin @step over plain functions."""
