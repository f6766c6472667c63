"""Python wrappers of the compiled backends (onebit._C)."""
