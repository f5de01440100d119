"""Benchmarks of the archive pipeline against their baselines (`make bench`, `python -m bench.run`).

Not part of `make test`: each measurement runs the product code and its baseline on the same
synthetic data in the same run, and writes `.bench/results.json` and `bench/RESULTS.md`.
"""
