"""Import of CellaVision-style smear exports from an inbox into the warehouse and image store."""
