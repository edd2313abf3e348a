"""Sequence parallelism for models of other libraries (imported only when used)."""
