"""Networks, training, evaluation, calibration (temperature, referral, OOD) and the model registry.

Plain Python over Keras, NumPy, pandas and DuckDB; nothing here knows about Dagster. Submodules are
imported explicitly (``from hema_pipeline.modeling.calibration import fit_temperature``) so that code
needing only the NumPy maths never pays for importing TensorFlow.
"""
