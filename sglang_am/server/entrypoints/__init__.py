"""Runs in SGLang's main (HTTP) process or beside an in-process Engine: routes, the service over the ranks, background work."""
