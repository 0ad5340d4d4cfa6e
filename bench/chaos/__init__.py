"""The chaos suite's runner: `python -m bench.chaos [--all] [--write]`."""
