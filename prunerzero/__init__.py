"""prunerzero: evolutionary search for symbolic pruning metrics of large language models."""

__version__ = "0.1.0"
