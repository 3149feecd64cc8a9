"""Pure scheduling policy shared by the operator, the local launcher and the simulator."""
