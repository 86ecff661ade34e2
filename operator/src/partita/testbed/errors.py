"""Errors of the local cluster; the CLI prints their message, never a traceback."""


class TestbedError(Exception):
    """Something the user can fix: a port taken, a missing binary, an unknown node, a bad file."""

    __test__ = False  # not a pytest test class
