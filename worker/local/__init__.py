"""The embedded default: launcher, local autoscaler, bench, profiler."""
