"""moxco.catalogue: every metric once, everything derived from it, docs tables current."""

import json

import pytest

from moxco import catalogue


def test_names_are_unique_and_groups_known():
    assert len(set(catalogue.ALL)) == len(catalogue.ALL)
    for m in catalogue.METRICS:
        assert m.group in catalogue.GROUPS and m.meaning


def test_derived_lists():
    assert catalogue.GOODNESS_TERMS == ("goodness_grad_term", "goodness_sharpness_term", "goodness_loss_term")
    gradient = set(catalogue.needing("gradient"))
    assert {"grad_norm_sq", "update_corr", "inst_gap", "inst_smooth", "convexity_ratio"} <= gradient
    assert not {"loss", "update_norm", "distance", "loss_diff"} & gradient
    loss = set(catalogue.needing("loss"))
    assert {"loss", "loss_diff", "inst_gap", "inst_smooth", "sharpness"} <= loss
    assert not {"grad_norm_sq", "update_norm", "distance", "update_corr", "update_corr_rs"} & loss
    with pytest.raises(ValueError):
        catalogue.needing("coffee")


def test_json_form_has_every_drawn_metric_once():
    data = json.loads(json.dumps(catalogue.to_json()))
    drawn = [s["metric"] for sec in data["sections"] for p in sec["panels"] for s in p["series"]]
    assert len(drawn) == len(set(drawn))
    assert set(drawn) == {m.name for m in catalogue.METRICS if m.panel}
    gap = next(p for sec in data["sections"] for p in sec["panels"] if p["id"] == "gap")
    assert gap["requires"] == ["needs reeval_every > 0"]
    ratio = next(p for sec in data["sections"] for p in sec["panels"] if p["id"] == "convexity_ratio")
    assert any("reference" in r for r in ratio["requires"])


def test_help_text_for_catalogue_and_user_metrics_is_one_line():
    assert "audit eq. 9" in catalogue.help_text("update_corr")
    assert "logged by the user" in catalogue.help_text("val_loss")
    for name in catalogue.ALL:
        assert "\n" not in catalogue.help_text(name) and "DESIGN" not in catalogue.help_text(name)


def test_docs_tables_are_generated_from_the_catalogue():
    assert catalogue.stale_docs() == [], "run `python -m moxco.catalogue --write`"


def test_curvature_probe_metrics_have_entries_panels_and_their_own_requirements():
    for name in ("sharpness_min", "sharpness_precond", "sharpness_precond_target", "hessian_trace"):
        entry = catalogue.metric(name)
        assert entry is not None and entry.group == "probe" and entry.panel, name
    assert catalogue.metric("sharpness_min").panel == catalogue.metric("sharpness").panel  # drawn beside it
    precond = catalogue.panel_metrics("sharpness_precond")
    assert [m.name for m in precond] == ["sharpness_precond", "sharpness_precond_target"]
    assert "Adam-family" in catalogue.requirement("sharpness_precond")
    assert "opt-in" in catalogue.requirement("hessian_trace")
    assert catalogue.requirement("sharpness") == catalogue.GROUPS["probe"][1]
    panels = {p["id"]: p for s in catalogue.to_json()["sections"] for p in s["panels"]}
    assert panels["sharpness_precond"]["requires"] == [catalogue.requirement("sharpness_precond")]
    assert "38/η" in catalogue.help_text("sharpness_precond_target") or "2(1+β₁)" in catalogue.help_text(
        "sharpness_precond_target")
