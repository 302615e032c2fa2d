"""Runs in each SGLang scheduler process: its documents, their registration, refits, solves, store and cache."""
