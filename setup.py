"""Build script: pure Python for now; the compiled extension (csrc/) joins with the norm issue."""

from setuptools import setup

setup()
