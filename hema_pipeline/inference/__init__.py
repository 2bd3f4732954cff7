"""Inference: per-cell predictions, smear differentials with exact intervals, flags, reports, Grad-CAM
and the core of ``hema classify``.

Modules that need TensorFlow (``predict``, ``gradcam``, ``classify``, ``smear``) are imported explicitly
by their callers; ``cards``, ``routing``, ``differential``, ``report`` and ``records`` are plain Python,
pandas and DuckDB, so building a report or querying never pays for importing TensorFlow.
"""
