"""tcpacct's benchmarks: ``make bench`` (``python -m bench.run``) writes results.md and
results.json next to this file. Timings live here, never in pass/fail tests."""
