-- Monitoring tables (hema_pipeline.monitoring). Applied idempotently after predictions.sql.

-- One row per failed Dagster run, written by the run-failure sensor. Messages are redacted of paths and
-- URLs (inbox names are accession numbers); Dagster's run log keeps the full error.
create table if not exists run_failures (
    run_id          varchar primary key,
    job_name        varchar not null,
    partition_key   varchar,                -- the smear pseudonym for per-smear jobs
    trigger         varchar,                -- the run's hema/trigger tag (inbox, nightly, retraining, ...)
    failed_steps    varchar[] not null,
    error_types     varchar[] not null,     -- exception class names of the failed steps
    message         varchar not null,
    failed_at       timestamp not null,     -- UTC
    recorded_at     timestamp not null      -- UTC
);
