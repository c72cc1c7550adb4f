"""Store backends on Ceph RADOS (librados's Python binding, Debian's python3-rados)."""
