-- hema-pipeline warehouse schema (DuckDB and PostgreSQL: written in their common dialect, see
-- hema_pipeline.storage.warehouse.DIALECT_TYPES). Applied idempotently by hema_pipeline.storage.warehouse.
-- Nothing here identifies a patient: patient_id and smear_id are keyed pseudonyms (HMAC-SHA256),
-- ages are 10-year bands, collection times are dates, free text and original file names are never stored.

-- One row per import of one smear (a Dagster partition run, or a CLI import).
create table if not exists import_runs (
    import_run_id          varchar primary key,
    smear_id               varchar not null,
    dagster_run_id         varchar,
    started_at             timestamp not null,
    finished_at            timestamp not null,
    status                 varchar not null,   -- imported | partially_quarantined | quarantined | already_present
    files_seen             integer not null,   -- every file in the smear folder, metadata included
    cells_imported         integer not null,   -- new or changed cell rows written by this run
    cells_quarantined      integer not null,
    cells_skipped_existing integer not null,   -- identical rows already present from an earlier import
    cells_updated          integer not null default 0,  -- of cells_imported, rows that existed and changed
                                                        -- (labels, image, or the smear's patient moved)
    cells_withdrawn        integer not null default 0   -- stored cells the latest export no longer lists
);
-- Warehouses created before these columns existed gain them here (each statement is idempotent).
alter table import_runs add column if not exists cells_updated integer default 0;
alter table import_runs add column if not exists cells_withdrawn integer default 0;

create table if not exists smears (
    smear_id          varchar primary key,
    patient_id        varchar not null,
    age_band          varchar not null,       -- e.g. '40-49', '90+'
    sex               varchar not null,       -- F | M | U
    collection_date   date not null,
    analyser_id       varchar not null,
    cell_count        integer not null,       -- cells imported (quarantined cells excluded)
    last_import_run_id varchar not null,
    updated_at        timestamp not null
);

create table if not exists cells (
    cell_uid        varchar primary key,      -- smear_id || ':' || cell_id
    smear_id        varchar not null,
    patient_id      varchar not null,
    cell_id         integer not null,         -- the analyser's cell number within the smear
    image_sha256    varchar not null,         -- of the stored (metadata-stripped) JPEG
    image_key       varchar not null,         -- key in the image store: images/ab/abcdef....jpg
    width           integer not null,
    height          integer not null,
    analyser_class  varchar not null,         -- the analyser's pre-classification
    verified_class  varchar,                  -- the technologist's class, null where not verified
    import_run_id   varchar not null,
    imported_at     timestamp not null
);

create table if not exists quarantine (
    quarantine_id     varchar primary key,    -- stable hash of (smear_id, cell_id, content, reason_code)
    smear_id          varchar not null,
    cell_id           integer,                -- null when the whole smear is quarantined
    reason_code       varchar not null,       -- see docs/import.md: per cell corrupt_image | not_an_image |
                                              -- image_too_large | unsupported_jpeg | missing_image |
                                              -- unknown_class | unreadable_file | not_a_regular_file |
                                              -- symlink_not_followed | file_too_large | unexpected_dimensions;
                                              -- per smear missing_metadata | malformed_metadata |
                                              -- unreadable_metadata | empty_smear | unlisted_file |
                                              -- accession_mismatch | invalid_folder_name |
                                              -- unreadable_folder | duplicate_folder
    reason            varchar not null,
    kept_key          varchar,                -- where the untouched file is kept in the quarantine store
    content_sha256    varchar,
    import_run_id     varchar not null,
    quarantined_at    timestamp not null,
    resolved_by_import_run_id varchar         -- set by the first later import of the smear that read its
                                              -- metadata and no longer found this problem
);

-- Cells with the label a model may learn from: the technologist's class only.
create or replace view verified_cells as
    select * from cells where verified_class is not null;

create or replace view open_quarantine as
    select * from quarantine where resolved_by_import_run_id is null;

-- The pseudonymisation scheme the warehouse was built with (one row, recorded at the first import):
-- a fingerprint of the HMAC key, never the key, and the identifier normalisations. A different key or
-- normalisation is refused, because its pseudonyms would not match these (see docs/operations.md).
create table if not exists pseudonym_scheme (
    scheme_id                   integer primary key check (scheme_id = 1),
    key_fingerprint             varchar not null,   -- first 16 hex of HMAC-SHA256(key, "hema-pipeline key fingerprint v1")
    record_number_normalisation varchar not null,   -- e.g. compact:v1 (HEMA_RECORD_NUMBER_NORMALISATION)
    accession_normalisation     varchar not null,   -- nfc-strip:v1
    smears_before               bigint not null,    -- smears already present when recorded (imported before the scheme was kept)
    created_at                  timestamp not null
);
