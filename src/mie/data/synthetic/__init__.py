"""Synthetic raw copies of the benchmarks, in the releases' exact on-disk layouts, for tests and
for timing ``mie prepare``. Nothing here is real data: signals are noise, texts are made up."""
