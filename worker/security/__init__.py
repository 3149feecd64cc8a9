"""Transport security of the data plane: mTLS between the gateway and the stages."""
