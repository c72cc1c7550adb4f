"""vdiskfs: virtual disks with instant copy-on-write clones, as files in a FUSE mount."""

__version__ = "0.1.0"
