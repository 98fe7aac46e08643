"""Measure: what a model executes (aten ops), how fast it runs (bench) and how it takes INT8
quantization (quant). Nothing here changes a model."""
