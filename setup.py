"""The package's metadata is in pyproject.toml; this file lets `python setup.py ...` habits work."""
from setuptools import setup

setup()
