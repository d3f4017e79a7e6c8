"""The version, low enough in the package that every layer may import it."""

__version__ = "0.1.0"
