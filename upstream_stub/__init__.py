"""A realistic stand-in for the transactions backend, for development, tests and benchmarks."""
