"""Shopsight: a distributed training and feature platform for e-commerce user-behaviour prediction."""

__version__ = "0.1.0"
__all__ = ["__version__"]
