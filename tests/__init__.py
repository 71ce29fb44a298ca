"""adaptkit test suite."""
