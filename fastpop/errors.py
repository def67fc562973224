"""Exceptions shared across layers; this module imports nothing from fastpop."""

from __future__ import annotations


class AuthUnavailable(Exception):
    """The user database cannot be read right now ([SYS/TEMP])."""
