"""The package version (its own module: the stages read it without importing the package's API)."""

__version__ = "0.1.0"
