"""Reproducible measurements; each prints JSON and writes a PNG where useful."""
