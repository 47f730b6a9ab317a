"""ZenML steps: one thin, typed @step per file, named by its verb, over the library in core/."""
