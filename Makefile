# Convenience targets; scripts/setup.sh does the real work (and installs what is missing).
.PHONY: deps mount test test-fast
deps:
	bash scripts/setup.sh deps
mount:
	bash scripts/setup.sh mount
test:
	bash scripts/setup.sh test
test-fast:   # engine and in-process tests only (no FUSE mounts)
	bash scripts/setup.sh test -m "not mount and not loop"
.PHONY: bench bench-quick
bench:       # benchmark suite (~10 min, root): table on stdout, JSON in bench/results/
	bash scripts/setup.sh bench
bench-quick: # reduced set (~2 min)
	bash scripts/setup.sh bench --quick
.PHONY: soak
soak:        # power-loss soak: random scenarios/seeds for VDISKFS_SOAK_SECONDS (default 600), root
	VDISKFS_SOAK_SECONDS=$(or $(VDISKFS_SOAK_SECONDS),600) .venv/bin/python -m pytest -q -s tests/t5_powerloss.py -k soak
