-- Datasets (hema_pipeline.datasets). Applied idempotently after schema.sql by hema_pipeline.storage.warehouse.
-- A dataset version is a content hash of its rows and configuration: the same inputs always give the same
-- version, so rewriting one is a no-op and two different datasets never share a version.

create table if not exists dataset_versions (
    dataset_version   varchar primary key,      -- '<task>-<16 hex of SHA-256>'
    task              varchar not null,
    config_json       varchar not null,         -- canonical JSON: task, split fractions, seed, image size, augmentation, sampling
    cell_count        integer not null,
    patient_count     integer not null,
    split_counts_json varchar not null,         -- {"train": {"<class>": cells, ...}, "validation": ..., ...}
    manifest_key      varchar not null,         -- the Parquet copy in the lake
    created_at        timestamp not null        -- first written; kept when the same version is written again
);

-- One row per cell per dataset version: which image, which label, which split.
create table if not exists dataset_manifests (
    dataset_version   varchar not null,
    task              varchar not null,
    cell_uid          varchar not null,
    patient_id        varchar not null,         -- pseudonym; kept so the patient grouping can be audited
    image_sha256      varchar not null,
    image_key         varchar not null,
    label             varchar not null,         -- the task class
    label_index       integer not null,         -- its position in the task's classes (the model output)
    split             varchar not null,         -- train | validation | calibration | test
    primary key (dataset_version, cell_uid)
);

-- Perceptual hashes by image content, computed once per image for the cross-split near-duplicate check.
create table if not exists image_perceptual_hashes (
    image_sha256      varchar not null,
    method            varchar not null,         -- phash | dhash
    hash              ubigint not null,         -- 64 hash bits, row-major
    primary key (image_sha256, method)
);
