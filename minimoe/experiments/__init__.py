"""One-command experiments whose results (JSON) are committed and loaded by the notebooks."""
