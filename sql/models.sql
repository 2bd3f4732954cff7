-- Model registry (hema_pipeline.modeling.registry). Applied idempotently after schema.sql.
-- Artefacts live in the object store, content-addressed:
--   models/<task>/<sha256 of model.keras>/model.keras
--   models/<task>/<sha256 of model.keras>/<model_version>/card.json (+ attachments: OOD statistics, figures)
-- These tables index them and record every promotion decision.

-- One row per registered (trained, calibrated, test-evaluated) model. Metrics are on the test split of
-- dataset_version, with the fitted temperature applied where it matters (NLL, ECE, referral).
create table if not exists models (
    model_version               varchar primary key,  -- <task>-<first 12 hex of the card's content hash>
    task                        varchar not null,
    dataset_version             varchar not null,     -- the dataset whose splits trained/calibrated/tested it
    code_version                varchar not null,     -- git commit (+ '-dirty') or package version
    architecture                varchar not null,     -- ArchitectureConfig.name: compact | standard | large | ...
    class_count                 integer not null,
    input_size                  integer not null,
    artifact_sha256             varchar not null,     -- of the .keras bytes
    artifact_key                varchar not null,
    card_key                    varchar not null,
    test_cells                  integer not null,
    accuracy                    double precision not null,
    macro_f1                    double precision not null,
    macro_auc                   double precision,               -- null where undefined (a class absent from the test split)
    nll_before                  double precision not null,      -- test NLL at T = 1
    nll_after                   double precision not null,      -- test NLL at the fitted temperature
    ece_before                  double precision not null,
    ece_after                   double precision not null,
    mce_before                  double precision not null,
    mce_after                   double precision not null,
    temperature                 double precision not null,
    referral_target             double precision not null,      -- accuracy the referral threshold is certified (or aimed) for
    referral_coverage           double precision not null,      -- share of test cells accepted
    referral_accepted_accuracy  double precision,               -- null when no test cell is accepted
    ood_method                  varchar,              -- energy | mahalanobis | null (none fitted)
    ood_threshold               double precision,
    ood_keep_quantile           double precision,
    training_seconds            double precision not null,
    training_device             varchar not null,     -- GPU | CPU
    created_at                  timestamp not null,   -- UTC
    -- candidate | champion | retired | refused | rolled_back: the model's last decision, written with its
    -- model_promotions event for people reading this table. Who is champion is model_champions' answer.
    status                      varchar not null
);

-- The referral certificate (modeling.calibration.fit_referral_policy): with probability referral_confidence,
-- accepted cells reach referral_target; referral_certified_accuracy is the Clopper-Pearson lower bound on
-- the calibration split at that confidence. Null for models fitted before certification, or where nothing
-- could be certified (every cell referred). Added columns: existing warehouses gain them here.
alter table models add column if not exists referral_confidence double precision;
alter table models add column if not exists referral_certified_accuracy double precision;

-- Per-class test metrics of each model (NaN-free: undefined values are null).
create table if not exists model_evaluations (
    model_version               varchar not null,
    class_index                 integer not null,
    class_name                  varchar not null,
    support                     integer not null,     -- test cells of this true class
    predicted                   integer not null,     -- test cells predicted as this class
    true_positives              integer not null,
    precision                   double precision,
    recall                      double precision,               -- sensitivity
    specificity                 double precision,
    f1                          double precision,
    roc_auc                     double precision,               -- one-vs-rest
    referral_threshold          double precision,               -- null: every cell predicted as this class is referred
    referral_threshold_source   varchar not null,
    referral_coverage           double precision,               -- share of test cells predicted as this class accepted
    referral_accepted_accuracy  double precision,
    primary key (model_version, class_name)
);

-- Event log of promotion decisions, append-only. For 'promoted' and 'refused' model_version is the
-- challenger; for 'rolled_back' it is the champion restored and previous_champion the one removed.
create table if not exists model_promotions (
    event_id           varchar primary key,
    task               varchar not null,
    sequence           integer not null,              -- 1, 2, ... per task: the order of decisions
    model_version      varchar not null,
    previous_champion  varchar,
    action             varchar not null,              -- promoted | refused | rolled_back
    reason             varchar not null,
    decided_at         timestamp not null             -- UTC
);

-- Two decisions can never share a place in a task's order (writers also serialise per task).
create unique index if not exists model_promotions_task_sequence on model_promotions (task, sequence);

-- The current champion of each task: the model named by the task's latest champion-changing event. The
-- one definition of "champion": current_predictions, promotion.current_champions and the
-- CLI all read it.
create or replace view model_champions as
    select task, model_version, action as became_champion_by, decided_at
    from (
        select *, row_number() over (partition by task order by sequence desc) as recency
        from model_promotions
        where action in ('promoted', 'rolled_back')
    ) as champion_changes
    where recency = 1;
