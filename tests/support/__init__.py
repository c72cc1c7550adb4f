"""Helper modules of the test suite (none of them holds tests; pytest collects only
tests/t[0-9]_*.py):

- ``common``: commands, files, ``Mount`` (a vdiskfs daemon), ``KernelMounts``, pool checks;
  used by every layer and by the fixtures in ../conftest.py.
"""
