"""Plain-Python building blocks shared by the steps (config, model sources, artifact types)."""
