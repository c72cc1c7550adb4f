"""Helper modules of the test suite (none of them holds tests; pytest collects only
tests/t[0-9]_*.py, see pyproject.toml):

- ``common``: commands, files, ``Mount`` (a vdiskfs daemon), ``KernelMounts``, pool checks;
  used by every layer and by the fixtures in ../conftest.py.
- ``clones``: ``SLOW`` (a pool whose clones can be watched), reading and following
  ``.ctl/status``; used by t4_clone and t4_clone_e2e.
- ``engine``: the engine tests' geometry, the in-memory refcount check, ``crash`` and
  ``reopen_after_crash``, data patterns.
- ``engine_model``: the randomized model test of the engine (``run_random``).
- ``powerloss``: the power-loss harness of t5_powerloss (``Rig``, ``DiskModel``,
  ``Writer``, the I/O plans).
"""
