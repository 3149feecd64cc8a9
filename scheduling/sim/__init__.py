"""The discrete-event simulator of a cluster under scaling policies."""
