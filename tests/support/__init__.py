"""Helpers the tests import (``from support.inprocess import Harness``); not tests themselves."""
