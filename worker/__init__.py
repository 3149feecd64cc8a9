"""Data plane: gateway, stage runtime, stage models, transports, local launcher."""
