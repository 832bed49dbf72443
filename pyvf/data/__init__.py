"""Data: the built-in synthetic task and the answer formats."""
