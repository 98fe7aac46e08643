"""Verify: the fused model against the original on seeded inputs (float64 reference, noise-relative
bar) and each fused conv against the ops it replaced; the report of both."""
