"""fedsite: the federated-learning agent a hospital runs next to its imaging data."""

__version__ = "0.1.0"
