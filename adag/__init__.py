"""ADAG: automatically trace and describe circuits of MLP neurons in transformer language models."""

__version__ = "0.1.0"
