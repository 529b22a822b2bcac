"""Benchmarks and the demo, outside the library: they drive the processes and judge them."""
