"""Benchmarks run by ``make bench``; figures go into BENCHMARKS.md with the command and machine."""
