"""Autoscaling glue: PromQL -> snapshot, the round's plan, the timer's I/O."""
