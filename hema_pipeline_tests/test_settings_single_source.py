"""One source for every setting (issue 16 item 2): each Dagster config or resource is the launchpad face of
a domain settings type, with the same fields and the same defaults; the domain type is where a default is
written. A field added to the domain type without its launchpad face fails here."""

from __future__ import annotations

import dataclasses

from hema_pipeline.datasets.versioning import DatasetBuildSettings, DatasetConfig
from hema_pipeline.defs.automation import RetrainingPolicyResource, retraining_policy_from_settings
from hema_pipeline.defs.datasets import DatasetBuildConfig
from hema_pipeline.defs.models import CalibrationConfig, PromotionConfig, TrainingRunConfig
from hema_pipeline.defs.predictions import FlagThresholdsConfig
from hema_pipeline.defs.quality import CellTableCheckConfig
from hema_pipeline.inference.flags import FlagSettings
from hema_pipeline.modeling.promotion import PromotionPolicy
from hema_pipeline.modeling.stage import CalibrationSettings, TrainingSettings
from hema_pipeline.monitoring.retraining import RetrainingPolicy
from hema_pipeline.quality.cell_suite import CellTableRules


def _domain_defaults(cls) -> dict:
    return {field.name: getattr(cls(), field.name) for field in dataclasses.fields(cls)}


def _launchpad_defaults(cls) -> dict:
    return {name: field.default for name, field in cls.model_fields.items()}


def test_dataset_build_config_is_the_domain_build_settings():
    assert _launchpad_defaults(DatasetBuildConfig) == _domain_defaults(DatasetBuildSettings)
    assert DatasetBuildConfig().build_settings() == DatasetBuildSettings()
    # The low-level dataset config agrees on the crop (it disagreed: 1.0 against the asset's 0.75).
    assert DatasetConfig(task="pbc8").crop_fraction == DatasetBuildSettings().crop_fraction == 0.75
    assert DatasetBuildConfig(crop_fraction=0.6, seed=3).build_settings().dataset_config("wbc4").crop_fraction == 0.6


def test_promotion_config_is_the_domain_policy():
    assert _launchpad_defaults(PromotionConfig) == _domain_defaults(PromotionPolicy)
    assert PromotionConfig(min_referral_coverage=0.97).policy() == dataclasses.replace(
        PromotionPolicy(), min_referral_coverage=0.97
    )


def test_training_and_calibration_configs_are_the_model_stage_settings():
    """The launchpad, the benchmarks and the domain functions share one set of defaults (they disagreed:
    40 epochs / patience 8 in one place, 70 / 25 in another)."""
    assert _launchpad_defaults(TrainingRunConfig) == _domain_defaults(TrainingSettings)
    assert _launchpad_defaults(CalibrationConfig) == _domain_defaults(CalibrationSettings)
    assert TrainingRunConfig(epochs=3, ensemble_members=2).settings() == TrainingSettings(epochs=3, ensemble_members=2)
    assert CalibrationConfig(test_time_views=4).settings() == CalibrationSettings(test_time_views=4)


def test_unset_training_settings_take_the_architectures_recipe_and_freezing_needs_pretrained_weights():
    import pytest

    from hema_pipeline.modeling.training import FROM_SCRATCH_RECIPE, PRETRAINED_RECIPE

    arch, config = TrainingSettings().resolve("pbc8", 64)  # pbc8's hint: the pretrained EfficientNet-Lite0
    assert arch.pretrained is not None
    assert (config.epochs, config.learning_rate, config.frozen_blocks) == (
        PRETRAINED_RECIPE.epochs,
        PRETRAINED_RECIPE.learning_rate,
        PRETRAINED_RECIPE.frozen_blocks,
    )
    # A configured value reaches the training configuration from the launchpad, over the recipe's.
    assert TrainingRunConfig(frozen_blocks=5).settings().resolve("pbc8", 64)[1].frozen_blocks == 5
    assert TrainingSettings(frozen_blocks=0, epochs=3).resolve("pbc8", 64)[1].frozen_blocks == 0
    with pytest.raises(ValueError, match="16 blocks"):
        TrainingSettings(frozen_blocks=17).resolve("pbc8", 64)
    _, scratch = TrainingSettings(architecture="compact").resolve("pbc8", 64)
    assert (scratch.epochs, scratch.frozen_blocks) == (FROM_SCRATCH_RECIPE.epochs, 0)
    with pytest.raises(ValueError, match="random weights"):
        TrainingSettings(architecture="compact", frozen_blocks=2).resolve("pbc8", 64)


def test_flag_thresholds_config_is_the_domain_flag_settings_but_the_fitted_threshold():
    launchpad, domain = _launchpad_defaults(FlagThresholdsConfig), _domain_defaults(FlagSettings)
    assert launchpad.pop("dysplasia_share_threshold") is None  # resolved at run time: the newest fit, else the domain's
    domain.pop("dysplasia_share_threshold")
    assert launchpad == domain


def test_cell_table_check_config_is_the_domain_rules():
    assert CellTableCheckConfig().rules() == CellTableRules()


def test_retraining_resource_is_the_domain_policy_and_environment_variables_override_it(monkeypatch):
    resource = _launchpad_defaults(RetrainingPolicyResource)
    assert {name: resource[name] for name in _domain_defaults(RetrainingPolicy)} == _domain_defaults(RetrainingPolicy)
    for name in (
        "HEMA_RETRAIN_MIN_NEW_VERIFIED_CELLS",
        "HEMA_RETRAIN_MAX_REFERRED_SHARE",
        "HEMA_RETRAIN_MIN_PREDICTIONS_FOR_DRIFT",
    ):
        monkeypatch.delenv(name, raising=False)
    assert retraining_policy_from_settings().policy() == RetrainingPolicy()
    monkeypatch.setenv("HEMA_RETRAIN_MIN_NEW_VERIFIED_CELLS", "120")
    assert retraining_policy_from_settings().policy() == dataclasses.replace(RetrainingPolicy(), min_new_verified_cells=120)
