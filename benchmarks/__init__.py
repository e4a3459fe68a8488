"""Benchmarks: thin command lines over pipeline/ that print a table and write JSON; `python benchmarks/NAME.py`."""
