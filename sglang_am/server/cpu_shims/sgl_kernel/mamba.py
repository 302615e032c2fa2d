"""Stand-in for ``sgl_kernel.mamba``: every attribute is a stub that raises when called."""

from . import _unavailable


def __getattr__(name: str):
    return _unavailable(f"mamba.{name}")
