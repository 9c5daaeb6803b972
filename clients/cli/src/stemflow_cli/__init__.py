"""The `stemflow` command line client of the Stemflow API."""

__version__ = "0.1.0"
