"""A tiny module with a bug that the tests catch and fix.py repairs."""


def add(a, b):
    return a - b


def mul(a, b):
    return a * b
