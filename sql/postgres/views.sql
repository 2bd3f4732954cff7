-- hema-pipeline views over predictions, PostgreSQL edition of ../views.sql: the same views, columns and
-- meaning, in PostgreSQL's dialect (no QUALIFY, json_object_keys for json_keys, explicit casts where
-- PostgreSQL would divide integers or return numeric). Keep the two files in step:
-- hema_pipeline_tests/test_inference_sql.py checks every view's hand-computed answers on both backends.

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
ranked as (
    select smear_id, task, model_version,
           row_number() over (
               partition by smear_id, task
               order by is_champion desc, last_predicted_at desc, model_version desc
           ) as preference
    from versions_per_smear
),
chosen as (
    select smear_id, task, model_version from ranked where preference = 1
)
select p.*
from predictions p
join chosen on chosen.smear_id = p.smear_id and chosen.task = p.task and chosen.model_version = p.model_version
where exists (select 1 from cells c where c.cell_uid = p.cell_uid);

create or replace view differential_per_smear as
with model_classes as (
    select one.model_version, json_object_keys(one.probabilities) as cell_class
    from (select distinct on (model_version) model_version, probabilities from current_predictions) as one
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
       (100.0 * coalesce(c.cells, 0) / nullif(m.accepted_cells, 0))::double precision as percent_of_accepted,
       k.cell_class not in ('erythroblast', 'platelet') as is_leukocyte,
       (100.0 * coalesce(c.cells, 0) / nullif(m.accepted_leukocytes, 0))::double precision as per_100_leukocytes
from per_model m
join model_classes k on k.model_version = m.model_version
left join per_class c
    on c.smear_id = m.smear_id and c.task = m.task and c.model_version = m.model_version and c.cell_class = k.cell_class;

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

create or replace view verified_agreement as
with compared as (
    select cast(date_trunc('week', s.collection_date) as date) as week_start,
           p.task,
           p.model_version,
           p.accepted,
           (p.probabilities -> c.verified_class) is not null as in_model_classes,
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
       (count(*) filter (where in_model_classes and agrees))::double precision
           / nullif(count(*) filter (where in_model_classes), 0) as agreement,
       count(*) filter (where in_model_classes and accepted) as accepted_cells,
       (count(*) filter (where in_model_classes and accepted and agrees))::double precision
           / nullif(count(*) filter (where in_model_classes and accepted), 0) as accepted_agreement,
       count(*) filter (where in_model_classes and not accepted) as referred_cells,
       count(*) filter (where not in_model_classes) as outside_model_classes
from compared
group by week_start, task, model_version;
