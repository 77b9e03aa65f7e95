"""Benchmark scripts that print tables (speed targets live here, not in timed tests)."""
