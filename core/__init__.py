"""The project's library: plain Python under the ZenML steps (see docs/layout.md)."""
