"""Builders of the builtin tiny models, one module per builtin (see builtin.py)."""
