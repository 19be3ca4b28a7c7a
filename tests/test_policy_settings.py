"""POLICY_SETTINGS says which policies read each cache setting (the nodes grey out the rest): checked against what
CacheConfig.build really does with each setting."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from scalekv_core.kvcache.config import POLICIES, POLICY_SETTINGS, CacheConfig
from scalekv_core.schedules import get_schedule

SCHEDULE = get_schedule(1.0, "0.06M")
#: A second value for each setting, different from CacheConfig's default.
OTHER = {"budget": "20%", "window": 9, "kernel": 3, "pooling": "avgpool", "scoring": "original",
         "refiner_decay": 2.0, "kv_dtype": "bf16"}


def built(config: CacheConfig) -> tuple:
    """What a setting can change: the policy object's state, the budget plan, and the storage dtypes."""
    policy, plan = config.build(SCHEDULE, 4, 2, 8, 2, torch.float32)
    return (type(policy).__name__, sorted((k, repr(v)) for k, v in vars(policy).items()), plan.kept,
            config.storage_dtypes(torch.float32))


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("setting", list(OTHER))
def test_a_setting_changes_a_run_only_under_the_policies_listed(policy, setting):
    base = CacheConfig(policy=policy, budget="10%", window=4 if policy == "scalekv" else 16)
    other = dataclasses.replace(base, **{setting: OTHER[setting]})
    if setting == "window" and policy == "scalekv":
        other = dataclasses.replace(base, window=9)
    changed = built(base) != built(other)
    assert changed == (policy in POLICY_SETTINGS[setting]), (policy, setting)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_budget_file_is_read_by_the_policies_listed_and_refused_by_the_others(policy):
    config = CacheConfig(policy=policy, budget_file="infinity-2b-10pct")
    if policy in POLICY_SETTINGS["budget_file"]:
        config.validate()
    else:
        with pytest.raises(ValueError, match="budget file applies to the scalekv policy only"):
            config.validate()


def test_every_cache_setting_a_user_sets_is_in_the_table():
    # drafters is set from Python only; float_keys by calibration's measurement (no widget offers either)
    user = {f.name for f in dataclasses.fields(CacheConfig)} - {"policy", "drafters", "float_keys"}
    assert user == set(POLICY_SETTINGS)


@pytest.mark.parametrize("size, depth, noted", [("0.06M", 4, True), ("1M", 32, False)])
def test_a_refiner_decay_that_changes_nothing_says_so(size, depth, noted) -> None:
    """At 256x256 and 10% the window's floor sets every refiner's cap, so refiner_decay 5 gives the plan of 0 (same
    pixels) with no word; the plan now notes it. At 1024x1024 it moves tokens, and no note is made."""
    schedule = get_schedule(1.0, size)
    plans = {d: CacheConfig(policy="scalekv", budget="10%", refiner_decay=d).build(schedule, depth, 2, 8, 2,
                                                                                   torch.float32)[1]
             for d in (0.0, 5.0)}
    assert (plans[5.0].kept == plans[0.0].kept) is noted
    notes = [n for n in plans[5.0].notes if n.startswith("refiner_decay 5 gives the same caps as 0")]
    assert len(notes) == (1 if noted else 0), plans[5.0].notes
    assert plans[0.0].notes == []
