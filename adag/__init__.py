"""ADAG: automatically trace and describe circuits of MLP neurons in transformer language models."""

from adag.version import __version__

__all__ = ["__version__", "show"]


def __getattr__(name: str):
    """`adag.show` (the viewer in a notebook), imported on first use so that `import adag` stays light."""
    if name == "show":
        from adag.report.notebook import show

        return show
    raise AttributeError(f"module 'adag' has no attribute {name!r}")
