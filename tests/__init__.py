"""The test suite, a package so that benchmarks import its fakes as ``tests.fakes`` (no ``sys.path`` edits)."""
