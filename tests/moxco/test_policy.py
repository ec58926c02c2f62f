"""The decision policy state machine: threshold, min step, k consecutive, cooldown, idempotence."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moxco.goodness import Goodness
from moxco.decision import Decision, decision_id
from moxco.policy import DEFAULT_LAG, DecisionPolicy, PolicyConfig, probe_steps


def feed(policy: DecisionPolicy, scores, start: int = 0, every: int = 10):
    fired = []
    for i, score in enumerate(scores):
        decision = policy.observe(start + i * every, score)
        if decision is not None:
            fired.append(decision)
    return fired


def test_fires_after_k_consecutive_probes_above_threshold():
    policy = DecisionPolicy(PolicyConfig(threshold=0.8, consecutive=3))
    fired = feed(policy, [0.9, 0.9, 0.5, 0.85, 0.81, 0.95, 0.99])
    assert [d.step for d in fired] == [50]  # the streak 0.85, 0.81, 0.95 completes at probe 5
    assert fired[0].goodness == 0.95
    assert fired[0].action == {"phase": 2, "alpha": 0.1, "beta": 0.1}
    assert policy.exhausted


def test_threshold_is_inclusive_and_nan_breaks_the_streak():
    policy = DecisionPolicy(PolicyConfig(threshold=0.8, consecutive=2))
    assert feed(policy, [0.8, math.nan, 0.8]) == []
    assert [d.step for d in feed(policy, [0.8], start=100)] == [100]


def test_min_step_and_cooldown_and_max_decisions():
    policy = DecisionPolicy(PolicyConfig(threshold=0.5, consecutive=1, min_step=30, cooldown=25, max_decisions=3))
    fired = feed(policy, [0.9] * 12)  # steps 0, 10, ..., 110
    assert [d.step for d in fired] == [30, 60, 90]
    assert policy.decisions_taken == 3 and policy.exhausted


def test_carries_the_three_goodness_terms():
    config = PolicyConfig(consecutive=1, action={"phase": 2, "alpha": 0.2, "beta": 0.0, "lr": 0.01})
    policy = DecisionPolicy(config)
    decision = policy.observe(7, Goodness(0.9, 0.01, 0.05, 0.04))
    # the decision records its cause: the policy that fired it, with its configuration then; and the
    # boundary it is applied at, fixed by that configuration (the probe's step + 1 + lag)
    assert decision == Decision(step=7, action={"phase": 2, "alpha": 0.2, "beta": 0.0, "lr": 0.01}, goodness=0.9,
                                grad_term=0.01, sharpness_term=0.05, loss_term=0.04, source="policy",
                                issued_by="policy", policy=config.to_dict(), apply_at=7 + 1 + config.lag)
    assert decision_id("run-a", decision.source, decision.step) == "run-a:policy:7"
    assert decision.with_run("run-a").id == "run-a:policy:7"
    assert decision.to_json()["action"]["lr"] == 0.01


def test_replayed_and_out_of_order_steps_are_ignored():
    policy = DecisionPolicy(PolicyConfig(threshold=0.8, consecutive=2))
    assert policy.observe(10, 0.9) is None
    assert policy.observe(10, 0.9) is None  # duplicate delivery of the same probe
    assert policy.observe(5, 0.9) is None  # late, out of order
    assert policy.observe(20, 0.9) is not None


def test_state_dict_round_trip_mid_streak_gives_the_same_decisions():
    scores = [0.9, 0.2, 0.9, 0.9, 0.95, 0.1, 0.9, 0.9, 0.9, 0.9]
    config = PolicyConfig(threshold=0.85, consecutive=3, cooldown=15, max_decisions=2)
    uninterrupted = feed(DecisionPolicy(config), scores)
    first = DecisionPolicy(config)
    part1 = feed(first, scores[:4])
    resumed = DecisionPolicy()
    resumed.load_state_dict(first.state_dict())
    part2 = feed(resumed, scores[4:], start=40)
    assert part1 + part2 == uninterrupted
    assert len(uninterrupted) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"consecutive": 0}, "consecutive"),
        ({"cooldown": -1}, "cooldown"),
        ({"min_step": 1.5}, "min_step"),
        ({"action": {"phase": 3}}, "phase"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)


def test_config_round_trip_and_unknown_fields():
    config = PolicyConfig(threshold=0.9, consecutive=2, action={"phase": 2, "alpha": 0.3})
    assert PolicyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown policy fields"):
        PolicyConfig.from_dict({"treshold": 0.9})


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)), max_size=60),
    threshold=st.floats(0.05, 1.0),
    consecutive=st.integers(1, 4),
    cooldown=st.integers(0, 40),
    min_step=st.integers(0, 100),
    max_decisions=st.integers(1, 3),
)
def test_invariants_hold_for_any_score_sequence(scores, threshold, consecutive, cooldown, min_step, max_decisions):
    config = PolicyConfig(threshold=threshold, consecutive=consecutive, cooldown=cooldown, min_step=min_step,
                          max_decisions=max_decisions)
    fired = feed(DecisionPolicy(config), scores, every=5)
    steps = [d.step for d in fired]
    assert len(fired) <= max_decisions
    assert all(s >= min_step for s in steps)
    assert all(b - a >= cooldown for a, b in zip(steps, steps[1:]))
    for d in fired:
        i = d.step // 5
        window = scores[i - consecutive + 1 : i + 1]
        assert len(window) == consecutive and all(s >= threshold for s in window)


@pytest.mark.parametrize("fields", [
    {"threshold": "x"}, {"threshold": True}, {"threshold": None}, {"threshold": 0}, {"threshold": 1.5},
    {"consecutive": True}, {"consecutive": 0}, {"max_decisions": 2.0}, {"min_step": -1}, {"cooldown": "1"},
    {"action": {"phase": 2, "lr": 50}},
])
def test_policy_fields_of_the_wrong_type_or_range_are_value_errors(fields):
    # a ValueError (the collector's 422), never a TypeError from the comparisons (a 500)
    with pytest.raises(ValueError):
        PolicyConfig.from_dict(fields)


def test_lag_fixes_the_boundary_a_decision_is_applied_at():
    """``apply_at = step + 1 + lag``: the boundary after the update of step ``step + lag``."""
    for lag in (0, 3):
        policy = DecisionPolicy(PolicyConfig(threshold=0.5, consecutive=1, lag=lag))
        assert policy.observe(40, 0.9).apply_at == 41 + lag
    assert PolicyConfig.from_dict({"threshold": 0.5}).lag == DEFAULT_LAG  # a policy stored without one
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError):
            PolicyConfig(lag=bad)


def test_probe_steps_are_the_run_level_goodness_points():
    from moxco.wire import Point

    batch = [Point(5, "goodness", 0.9, 0.0), Point(5, "goodness", 0.9, 0.0, rank=1), Point(6, "loss", 1.0, 0.0),
             (10, "goodness", 0.2, 0.0), (11, "goodness", 0.2, 0.0, 0)]
    assert probe_steps(batch) == [5, 10]
