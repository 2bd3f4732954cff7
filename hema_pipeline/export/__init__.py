"""The CellaVision-style export format, its synthetic generator and the PBC adapter."""
