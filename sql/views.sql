-- hema-pipeline views over predictions (DuckDB). Applied last by hema_pipeline.storage.warehouse, after
-- models.sql: these views read models and the model_champions view, and DuckDB binds a view when it is
-- created.

-- The predictions that count for each smear and task: those of the task's champion model (model_champions,
-- the promotion log's answer; the one definition of "champion") where it has run on the smear, otherwise those of the model version that ran on it most recently. A challenger
-- run in shadow beside the champion therefore never changes what the lab sees.
create or replace view current_predictions as
with versions_per_smear as (
    select p.smear_id,
           p.task,
           p.model_version,
           max(p.predicted_at) as last_predicted_at,
           coalesce(bool_or(ch.model_version is not null), false) as is_champion
    from predictions p
    left join model_champions ch on ch.model_version = p.model_version and ch.task = p.task
    group by p.smear_id, p.task, p.model_version
),
chosen as (
    select smear_id, task, model_version
    from versions_per_smear
    qualify row_number() over (
        partition by smear_id, task
        order by is_champion desc, last_predicted_at desc, model_version desc
    ) = 1
)
select p.*
from predictions p
join chosen on chosen.smear_id = p.smear_id and chosen.task = p.task and chosen.model_version = p.model_version
-- A cell withdrawn by a later re-export of its smear no longer counts, whatever was predicted for it.
where exists (select 1 from cells c where c.cell_uid = p.cell_uid);

-- The differential per smear and task from the current predictions: every class the model knows (a
-- class with no cells shows 0), its accepted cells and its percentage of the accepted cells. Referred
-- cells are counted in no class until a technologist classifies them.
-- per_100_leukocytes follows the leukocyte-differential convention of hema_pipeline.inference.differential
-- (NON_LEUKOCYTE_CLASSES): erythroblasts and platelets are left out of the denominator; for a leukocyte
-- class it is its % of accepted leukocytes, for an erythroblast or platelet its count per 100 leukocytes.
create or replace view differential_per_smear as
with model_classes as (
    select model_version, unnest(json_keys(any_value(probabilities))) as cell_class
    from current_predictions
    group by model_version
),
per_model as (
    select smear_id,
           task,
           model_version,
           count(*) as total_cells,
           count(*) filter (where accepted) as accepted_cells,
           count(*) filter (where not accepted) as referred_cells,
           count(*) filter (where accepted and predicted_class not in ('erythroblast', 'platelet')) as accepted_leukocytes
    from current_predictions
    group by smear_id, task, model_version
),
per_class as (
    select smear_id, task, model_version, predicted_class as cell_class, count(*) as cells
    from current_predictions
    where accepted
    group by smear_id, task, model_version, predicted_class
)
select m.smear_id,
       m.task,
       m.model_version,
       k.cell_class,
       coalesce(c.cells, 0) as cells,
       m.accepted_cells,
       m.referred_cells,
       m.total_cells,
       100.0 * coalesce(c.cells, 0) / nullif(m.accepted_cells, 0) as percent_of_accepted,
       k.cell_class not in ('erythroblast', 'platelet') as is_leukocyte,
       100.0 * coalesce(c.cells, 0) / nullif(m.accepted_leukocytes, 0) as per_100_leukocytes
from per_model m
join model_classes k on k.model_version = m.model_version
left join per_class c
    on c.smear_id = m.smear_id and c.task = m.task and c.model_version = m.model_version and c.cell_class = k.cell_class;

-- Cells awaiting a technologist: referred by a current model and not yet verified. A cell leaves the
-- queue when a re-import brings its verified class.
create or replace view referral_queue as
select p.smear_id,
       p.cell_uid,
       c.cell_id,
       p.task,
       p.model_version,
       p.predicted_class,
       p.confidence,
       p.energy,
       p.referral_reason,
       p.gradcam_key,
       c.image_key,
       c.analyser_class,
       p.predicted_at,
       p.prediction_run_id
from current_predictions p
left join cells c on c.cell_uid = p.cell_uid
where not p.accepted and c.verified_class is null;

-- Where every prediction came from: the model version, the dataset version it was trained on, and the
-- import run that brought the cell's image. Left joins: a prediction by an unregistered model, or of a
-- cell since re-imported under another run, still shows (with nulls where the link is missing).
create or replace view prediction_lineage as
select p.smear_id,
       p.cell_uid,
       p.task,
       p.model_version,
       m.status as model_status,
       m.dataset_version,
       p.prediction_run_id,
       p.predicted_at,
       c.image_sha256,
       c.import_run_id,
       r.dagster_run_id as import_dagster_run_id,
       r.started_at as import_started_at
from predictions p
left join models m on m.model_version = p.model_version and m.task = p.task
left join cells c on c.cell_uid = p.cell_uid
left join import_runs r on r.import_run_id = c.import_run_id;

-- How often each model version agrees with the technologist, per week of smear collection (ISO weeks,
-- starting Monday): over all compared cells, and over the cells it accepted (what reaches the
-- differential unreviewed). A verified class the model does not have (e.g. a blast, for a model without
-- one) cannot agree; such cells are counted apart in outside_model_classes, not as disagreements. Every
-- model version's predictions are included, so a challenger can be compared with the champion on the
-- same weeks.
create or replace view verified_agreement as
with compared as (
    select cast(date_trunc('week', s.collection_date) as date) as week_start,
           p.task,
           p.model_version,
           p.accepted,
           list_contains(json_keys(p.probabilities), c.verified_class) as in_model_classes,
           p.predicted_class = c.verified_class as agrees
    from predictions p
    join cells c on c.cell_uid = p.cell_uid
    join smears s on s.smear_id = p.smear_id
    where c.verified_class is not null
)
select week_start,
       task,
       model_version,
       count(*) filter (where in_model_classes) as verified_cells,
       count(*) filter (where in_model_classes and agrees) as agreeing_cells,
       (count(*) filter (where in_model_classes and agrees))
           / nullif(count(*) filter (where in_model_classes), 0) as agreement,
       count(*) filter (where in_model_classes and accepted) as accepted_cells,
       (count(*) filter (where in_model_classes and accepted and agrees))
           / nullif(count(*) filter (where in_model_classes and accepted), 0) as accepted_agreement,
       count(*) filter (where in_model_classes and not accepted) as referred_cells,
       count(*) filter (where not in_model_classes) as outside_model_classes
from compared
group by week_start, task, model_version;
