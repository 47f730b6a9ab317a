"""The feedback loop: served answers logged, rated and corrected (store.py), and turned into training data."""
