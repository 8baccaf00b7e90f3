"""Training-only helpers: losses and targets that shape a model during training and are not part
of the exported model."""
