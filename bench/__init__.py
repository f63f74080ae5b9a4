"""Benchmarks of costobs-callbacks (scripts, not tests): see ``bench/README.md``."""
