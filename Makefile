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
