"""Benchmarks: scripts that print a table and write JSON; run as `python benchmarks/NAME.py`."""
