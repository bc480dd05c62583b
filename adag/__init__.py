"""ADAG: automatically trace and describe circuits of MLP neurons in transformer language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`adag.show` (the viewer in a notebook), imported on first use so that `import adag` stays light."""
    if name == "show":
        from adag.report.notebook import show

        return show
    raise AttributeError(f"module 'adag' has no attribute {name!r}")
