"""hema-pipeline: CellaVision-style blood-smear exports -> anonymised datasets, models and predictions."""

__version__ = "0.1.0"
