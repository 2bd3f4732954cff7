-- hema-pipeline prediction tables (DuckDB and PostgreSQL). Applied idempotently after schema.sql, datasets.sql and
-- models.sql by hema_pipeline.storage.warehouse; written by hema_pipeline.inference.records.
-- Rows carry smear and cell pseudonyms only, like every table in the warehouse.

-- One row per cell and model version. Re-running a model on a smear upserts by key, so it never adds
-- rows; a new model version adds its own rows beside the old ones (compare them, or see
-- current_predictions in views.sql for the version that counts).
create table if not exists predictions (
    smear_id           varchar not null,
    cell_uid           varchar not null,      -- cells.cell_uid
    model_version      varchar not null,
    task               varchar not null,
    predicted_class    varchar not null,
    confidence         double precision not null,       -- calibrated probability of predicted_class: softmax(logits / T)
    probabilities      json not null,         -- {"class": calibrated probability, ...} over the model's classes
    energy             double precision not null,       -- -T logsumexp(logits / T) at the card's energy temperature (usually 1)
    ood_score          double precision,                -- the score compared with the card's ood_threshold (the energy, or a
                                              -- feature-space score: models.ood_method); null: no OOD threshold
    accepted           boolean not null,
    referral_reason    varchar,               -- null when accepted | low_confidence | unfamiliar
    gradcam_key        varchar,               -- Grad-CAM PNG in the object store, where one was rendered
    predicted_at       timestamp not null,    -- UTC
    prediction_run_id  varchar not null,
    primary key (smear_id, cell_uid, model_version),
    check (confidence >= 0 and confidence <= 1),
    check (referral_reason is null or referral_reason in ('low_confidence', 'unfamiliar')),
    check (accepted = (referral_reason is null))
);

-- One row per smear and report version. report_version hashes the model versions and every threshold
-- and setting that decided the report, so re-running unchanged models replaces the row, and a new
-- model or threshold adds a new one (the history of what the lab was shown stays queryable).
create table if not exists smear_reports (
    smear_id           varchar not null,
    report_version     varchar not null,
    model_versions     json not null,         -- {"task": "model_version", ...}
    differential       json not null,         -- per model: counts, percentages, exact intervals, range marks
    flags              json not null,         -- [{"code": ..., "message": ...}, ...]
    flag_codes         varchar[] not null,    -- the flag codes again, for `list_contains(flag_codes, ...)`
    total_cells        integer not null,
    referred_cells     integer not null,
    agreement          json,                  -- with the analyser's pre-classification; null when not computed
    thresholds         json not null,         -- model temperatures, class and energy thresholds, flag settings, reference ranges
    markdown           varchar not null,
    prediction_run_id  varchar not null,
    created_at         timestamp not null,    -- UTC
    primary key (smear_id, report_version)
);

-- One row per fit of a smear-level threshold on the lab's labelled smears (`hema thresholds fit`,
-- hema_pipeline.inference.smear_thresholds), recorded like the promotion gate's decisions. The newest fit
-- of a threshold is what the `smear_flag_thresholds` asset uses unless its config sets the value. Only a
-- digest of the labels is kept, never the labels themselves.
create table if not exists smear_threshold_fits (
    fit_id            varchar primary key,
    threshold_name    varchar not null,        -- dysplasia_share_threshold
    threshold         double precision not null,  -- flagged when the share is strictly greater
    sensitivity       double precision not null,
    specificity       double precision not null,
    youden_j          double precision not null,
    auc               double precision not null,
    positive_smears   integer not null,
    negative_smears   integer not null,
    model_version     varchar not null,        -- the neutrophil_dysplasia champion whose shares were fitted
    labels_sha256     varchar not null,        -- of the sorted (smear pseudonym, label) pairs
    reason            varchar not null,
    fitted_at         timestamp not null       -- UTC
);
