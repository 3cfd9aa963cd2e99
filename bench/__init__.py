"""Benchmarks: `python -m bench.offline` (engine on a GPU), `python bench/router.py` (router)."""
