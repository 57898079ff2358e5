"""Training: plans, the model registry, local train and evaluate, the worker process."""
