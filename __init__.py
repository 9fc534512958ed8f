"""Atoll: host thousands of customised LLMs securely across scattered islands of GPUs."""

__version__ = "0.1.0"
