# cffi's `cffi_modules` still needs a setup.py; all metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cext/build_native.py:ffibuilder"])
