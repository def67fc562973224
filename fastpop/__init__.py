"""fastpop: a fast, correct POP3 server."""

from fastpop._version import __version__

__all__ = ["__version__"]
