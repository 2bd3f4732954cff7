"""From verified cell rows to versioned, leak-free training datasets and fast ``tf.data`` input pipelines.

- ``tasks``: the clinical tasks (which import labels a model learns, as which classes) and whether a
  task has enough data to train;
- ``splits``: train / validation / calibration / test, stratified by class and grouped by patient;
- ``near_duplicates``: perceptual hashes and the cross-split near-duplicate finder;
- ``versioning``: content-hash dataset versions and the manifest (Parquet + DuckDB);
- ``augmentation`` and ``input_pipeline``: on-the-fly augmentation and the ``tf.data`` pipelines.

TensorFlow is imported only by ``augmentation`` and ``input_pipeline``, so the other modules stay cheap to
import.
"""
