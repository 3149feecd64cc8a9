"""Generated gRPC code for the disagfusion wire contract (see disagfusion.proto)."""
