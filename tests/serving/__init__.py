"""Tests of loraforge serve (a package: its conftest.py must not shadow tests/conftest.py)."""
