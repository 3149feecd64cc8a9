"""The gateway: OpenAI-compatible HTTP and gRPC front, validation, jobs."""
