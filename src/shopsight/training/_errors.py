"""The error a model's own code raises for input it cannot use.

A registered pyfunc carries the modules it needs (MLflow ``code``), not the platform: loaded where
Shopsight is installed, its errors are :class:`~shopsight.platform.ShopsightError` (the CLI prints them on
one line); loaded alone, as any MLflow model, they are ``ValueError``.
"""

from __future__ import annotations


def user_error(message: str) -> Exception:
    """ShopsightError(message) where the platform is importable, else ValueError(message)."""
    try:
        from shopsight.platform._errors import ShopsightError
    except ImportError:  # the model's code travelled without the platform (or without its packages)
        return ValueError(message)
    return ShopsightError(message)


__all__ = ["user_error"]
