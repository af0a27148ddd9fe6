"""Developer scripts (protos, mutants); runnable as files, importable by the tests."""
