"""The command line: the `sail-fast` parser and each command's work."""
