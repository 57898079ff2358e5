"""Weights in and out: the safetensors codec, the egress gate, privacy filters, and the
secure-aggregation protocol (`secagg`), which the coordinator shares as wire contract."""
