"""Operator and testing tools: the local simulator, pytest helpers, ``check``, run reports."""
