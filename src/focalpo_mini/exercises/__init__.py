"""Checkers for the book's exercises: ``check_<name>(fn)`` tests a reader's function.

A right answer prints one success line; a wrong one raises ``AssertionError`` that names the failing input,
the expected and the received value, and the most likely mistake. Each chapter group has its own module.
"""
