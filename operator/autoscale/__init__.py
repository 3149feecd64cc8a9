"""Autoscaling glue between Prometheus, the scheduling policy and the cluster.

- `observe`: the PromQL queries and their answers turned into a Snapshot (pure).
- `plan`: one round's plan from the spec, status, Snapshot, Decision and `now`:
  the status patch, history entries, sizes to apply, Events and metric values
  (pure).
- `prometheus`: the Prometheus HTTP API client (I/O).
- `timer`: the kopf timer's round: read the StatefulSets, ask Prometheus, run
  the policy, call the plan, write status, StatefulSets, Events and metrics
  (I/O). It imports nothing of handlers.py; the shared state is context.py's.
"""
