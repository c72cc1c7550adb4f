"""The NBD server (protocol.py: the wire format; server.py: exports of a mounted pool)."""
