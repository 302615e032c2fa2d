"""Unit tests of sglang_am.server, one file per module, run without a server."""
