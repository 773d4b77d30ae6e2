"""The `kv3d` command line, the top of the stack: it may import every other layer."""
