"""attach's options: one explicit signature, every value checked with a message that names it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import moxco.agent
from moxco.agent.options import OPTION_NAMES, AgentOptions, GoodnessSettings
from moxco.policy import PolicyConfig


@pytest.fixture
def model_and_optimizer():
    model = nn.Linear(2, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_attach_has_every_option_as_a_keyword_with_the_options_default_and_documents_it():
    parameters = inspect.signature(moxco.agent.attach).parameters
    keywords = {n: p for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert tuple(keywords) == OPTION_NAMES
    defaults = {f.name: f.default for f in dataclasses.fields(AgentOptions)}
    assert {n: p.default for n, p in keywords.items()} == defaults
    for name in OPTION_NAMES:
        assert f"``{name}``" in moxco.agent.attach.__doc__, name


@pytest.mark.parametrize("given, suggestion", [("reeval_evry", "reeval_every"), ("probe_evry", "probe_every"), ("probe_dat", "probe_data"),
                                               ("random_scale", "random_scaling"), ("critérion", "criterion")])
def test_an_unknown_keyword_is_a_type_error_naming_it_and_the_closest_option(model_and_optimizer, given, suggestion):
    model, opt = model_and_optimizer
    with pytest.raises(TypeError, match=f"unknown attach\\(\\) option '{given}'; did you mean '{suggestion}'"):
        moxco.agent.attach(model, opt, **{given: 1})
    assert not opt._optimizer_step_pre_hooks  # nothing was attached


def test_an_unknown_keyword_with_nothing_close_lists_the_options(model_and_optimizer):
    with pytest.raises(TypeError, match="unknown attach\\(\\) option 'zzz'; valid: url, run, reeval_every"):
        moxco.agent.attach(*model_and_optimizer, zzz=1)


@pytest.mark.parametrize("option, value, message", [
    ("reeval_every", -1, "reeval_every must be a non-negative integer, got -1"),
    ("probe_every", 2.5, "probe_every must be a non-negative integer, got 2.5"),
    ("start_step", True, "start_step must be a non-negative integer, got True"),
    ("sharpness_iters", 0, "sharpness_iters must be a positive integer, got 0"),
    ("sharpness_refine", 0, "sharpness_refine must be None or a number in \\(0, 1\\], got 0"),
    ("sharpness_refine", True, "sharpness_refine must be None or a number in \\(0, 1\\], got True"),
    ("sharpness_refine", 1.5, "sharpness_refine must be None or a number in \\(0, 1\\], got 1.5"),
    ("sharpness_hvp", "double", "sharpness_hvp must be one of \\('auto', 'autograd', 'finite_difference'\\)"),
    ("sharpness_precond", "yes", "sharpness_precond must be None \\(on for Adam-family optimizers\\), True or False"),
    ("hessian_trace", -1, "hessian_trace must be True, False or a number of Hutchinson samples ≥ 0, got -1"),
    ("probe_batches", 0, "probe_batches must be a positive integer, got 0"),
    ("probe_data", "batches.pt", "probe_data must be a batch"),
    ("seed", "7", "seed must be an integer or None, got '7'"),
    ("random_scaling", "yes", "random_scaling must be True or False, got 'yes'"),
    ("track_distance", None, "track_distance must be True or False, got None"),
    ("url", "", "url must be a non-empty string or None, got ''"),
    ("run", "a/b", "run 'a/b': a run name may not contain '/'"),
    ("criterion", torch.nn.functional.mse_loss, "criterion must be an nn.Module"),
    ("loss_fn", 3, "loss_fn must be callable or None, got 3"),
    ("reference", 3, "reference must be a state_dict or a checkpoint path, got int"),
    ("config", ["a"], "config must be a mapping or None, got list"),
    ("scaler", object(), "scaler must be a torch.amp.GradScaler"),
    ("goodness", {"tau": -1.0}, "goodness tau must be a finite positive number, got -1.0"),
    ("goodness", {"form": "hinge"}, "goodness form must be one of"),
    ("goodness", {"sharpness": "adam"}, "goodness sharpness must be one of \\('plain', 'precond'\\)"),
    ("goodness", {"tua": 1.0}, "unknown goodness setting 'tua'; did you mean 'tau'"),
    ("policy", {"threshold": 2.0}, "threshold must be a number in \\(0, 1\\]"),
    ("policy", {"consecutiv": 2}, "unknown policy setting 'consecutiv'; did you mean 'consecutive'"),
])
def test_a_bad_value_is_a_value_error_naming_the_option_and_the_value(model_and_optimizer, option, value, message):
    model, opt = model_and_optimizer
    with pytest.raises(ValueError, match=message):
        moxco.agent.attach(model, opt, **{option: value})
    assert not opt._optimizer_step_pre_hooks


def test_goodness_and_policy_become_their_typed_settings():
    options = AgentOptions(goodness={"tau": 2.0}, policy={"threshold": 0.9}, seed=3)
    assert options.goodness == GoodnessSettings(tau=2.0)
    assert options.policy == PolicyConfig(threshold=0.9)
    defaults = AgentOptions()
    assert defaults.goodness == GoodnessSettings() and defaults.policy == PolicyConfig()
    assert (defaults.reeval_every, defaults.probe_every, defaults.track_distance) == (10, 100, True)
    assert defaults.goodness.sharpness == "plain" and defaults.probe_batches == 4
    # hessian_trace: True is 10 Hutchinson samples, a number that many, False none
    assert [AgentOptions(hessian_trace=v).hessian_trace for v in (False, True, 25, 0)] == [0, 10, 25, 0]
