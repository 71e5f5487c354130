"""asv benchmarks for polyopt (see docs/performance.md)."""
