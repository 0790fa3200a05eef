"""The sections of BENCHMARKS.md, one module per kind of result; `tools/write_benchmarks_md.py` puts them together."""
