"""The vdiskfs benchmark suite; bench/run.py is its entry point (see there)."""
