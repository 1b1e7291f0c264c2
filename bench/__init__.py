"""Benchmarks of the gateway pipeline: `python -m bench <scenario> [--quick]` (see bench/__main__.py).

Every scenario runs on loopback, is bounded in requests and seconds, prints its tables and appends them to
bench/RESULTS.md with the date, the machine and the command that reproduces them.
"""
