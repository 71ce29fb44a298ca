"""The adaptkit version, in a module of its own so that ``adaptkit --version`` imports nothing else."""

__version__ = "0.1.0"
