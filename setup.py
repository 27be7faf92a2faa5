"""Build entry point.

All metadata lives in pyproject.toml. This file exists so that the optional CUDA C++
extension (csrc/, a later milestone) can be added conditionally: it is built only
where torch has CUDA, and skipped with a message elsewhere.
"""
from setuptools import setup

setup()
