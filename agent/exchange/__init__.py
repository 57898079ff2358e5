"""Weights in and out: the safetensors codec, the egress gate, privacy filters."""
