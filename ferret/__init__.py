"""Ferret: refer and ground anything anywhere at any granularity."""
