"""Tests are a package so that tests/server/test_<module>.py may share a basename with a topic file here
(pytest's default import mode would take the two for one module)."""
