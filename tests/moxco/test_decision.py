"""moxco.decision: one validation of actions, one JSON form, the cause of every decision."""

import math

import pytest

from moxco.decision import Decision, DecisionError, validate_action


@pytest.mark.parametrize("action", [
    {"alpha": 5}, {"lr": -1}, {"lr": 1e308 * 10}, {"lr": 1e308}, {"lr": 50}, {"lr": 10.000001}, {"lr": 0}, {"beta": -3}, {"alpha": 1.0}, {"phase": 3},
    {"phase": "2"}, {"phase": True}, {"reset_inertia": False}, {"lr": "fast", "x": [1]}, {"lr": math.nan}, [], "x",
])
def test_invalid_actions_are_refused(action):
    with pytest.raises(DecisionError):
        validate_action(action)


def test_lr_is_bounded_above_by_max_lr():
    from moxco.decision import MAX_LR

    assert MAX_LR == 10.0 and validate_action({"lr": 10}) == {"phase": 2, "lr": 10.0}
    with pytest.raises(DecisionError, match=r"\(0, 10\]"):
        validate_action({"lr": 1e308})


def test_valid_actions_are_normalised():
    assert validate_action({}) == {"phase": 2}
    assert validate_action({"phase": 1, "lr": 1}) == {"phase": 1, "lr": 1.0}
    assert validate_action({"alpha": 0.0, "beta": 0.999}) == {"phase": 2, "alpha": 0.0, "beta": 0.999}


def test_a_decision_cannot_hold_an_invalid_action():
    with pytest.raises(DecisionError):
        Decision(5, {"phase": 2, "alpha": 5})
    with pytest.raises(DecisionError):
        Decision(5, source="someone")
    with pytest.raises(DecisionError):
        Decision(5, apply_at=4)


def test_json_round_trip_status_and_id():
    d = Decision(40, {"phase": 2, "lr": 0.01}, goodness=0.9, grad_term=math.nan, sharpness_term=0.1, loss_term=0.05,
                 run="r", policy={"threshold": 0.85}, apply_at=41, created_at=123.0)
    data = d.to_json()
    assert data["id"] == "r:policy:40" and data["status"] == "pending" and data["grad_term"] is None
    assert Decision.from_json(data) == d
    done = d.acknowledged(41, 124.0)
    assert done.status == "applied" and Decision.from_json(done.to_json()) == done
    refused = d.acknowledged(41, 124.0, rejected="optimizer has no commit")
    assert refused.status == "rejected"
    with pytest.raises(DecisionError):
        Decision.from_json({"action": {}})
    with pytest.raises(DecisionError):
        Decision.from_json({"step": 1, "action": {"alpha": 5}})


def test_describe_names_who_decided_and_why():
    policy = Decision(421, {"phase": 2}, goodness=0.91, policy={"threshold": 0.85}, run="r")
    assert "the policy" in policy.describe() and "0.910 ≥ C = 0.85" in policy.describe()
    operator = Decision(421, {"phase": 2}, source="operator", issued_by="alice", reason="plateau", run="r")
    text = operator.describe()
    assert "operator 'alice'" in text and "plateau" in text and "nan" not in text.lower()
    assert "not measured" in Decision(3, run="r").describe()


def test_reproducibility_says_whether_decisions_were_applied_where_the_configuration_puts_them():
    from moxco.decision import reproducibility

    on_time = Decision(60, run="r", apply_at=63, applied_step=63, applied_at=1.0)
    late = Decision(60, run="r", apply_at=63, applied_step=71, applied_at=1.0)
    sync = {"decisions": {"mode": "sync", "timeouts": 1}}
    assert reproducibility(sync, [on_time])["reproducible"] is True
    assert reproducibility(sync, [Decision(60, run="r", apply_at=63)])["reproducible"] is True  # pending: not applied
    verdict = reproducibility(sync, [late])
    assert verdict["reproducible"] is False and verdict["late"] == [(60, 63, 71)] and "8 step(s)" in verdict["reason"]
    assert "asynchronous" in reproducibility({"decisions": {"mode": "async"}}, [on_time])["reason"]
    assert reproducibility({}, [on_time])["reproducible"] is False  # the mode was not recorded
    assert reproducibility({}, [])["reproducible"] is True
    operator = Decision(5, source="operator", issued_by="ops", run="r", applied_step=6, applied_at=1.0)
    assert "operator" in reproducibility(sync, [on_time, operator])["reason"]
    assert late.lateness == 8 and Decision(5).lateness is None
