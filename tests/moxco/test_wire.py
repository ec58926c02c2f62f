"""moxco.wire: one rule for names and values, whole-string checks, the same columns from the API's
JSON and from Python points."""

import math

import pytest

from moxco import wire
from moxco.wire import Point, WireError


@pytest.mark.parametrize("name", ["run", "名前", " lead", "trail ", "\u202eevil", "zero\u200bwidth", "x" * 200, "a.b", "..."])
def test_run_names_accepted(name):
    assert wire.check_run_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 201, "a/b", ".", "..", "   ", "new\nline", "tail\n", "nul\x00", "del\x7f",
                                  "c1\x85", "tab\t", "\ud800", 5, None])
def test_run_names_refused(name):
    with pytest.raises(WireError):
        wire.check_run_name(name)


@pytest.mark.parametrize("name", ["loss", "val/loss", "eval_accuracy", "λ", "x" * 100])
def test_metric_names_accepted(name):
    assert wire.check_metric_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 101, "loss\n", "lo\x00ss", "\x1b[31m", 3])
def test_metric_names_refused_as_whole_strings(name):
    # "loss\n" passed a regex ending in $ (which matches before a final newline)
    with pytest.raises(WireError):
        wire.check_metric_name(name)


def test_batch_ids_and_texts():
    assert wire.check_batch_id("abc-1") == "abc-1"
    for bad in ("", "x" * 201, "a\nb", "a\x00", 7):
        with pytest.raises(WireError):
            wire.check_batch_id(bad)
    assert wire.check_text("line one\nline two\tend") == "line one\nline two\tend"
    for bad in ("x" * 1001, "nul\x00", "esc\x1b", None):
        with pytest.raises(WireError):
            wire.check_text(bad)


def test_values_round_trip_and_negative_zero_is_zero():
    for value in (1.5, -2.0, 1e308, 5e-324, math.inf, -math.inf):
        assert wire.decode_value(wire.encode_value(value)) == value
    assert math.isnan(wire.decode_value(wire.encode_value(math.nan)))
    assert math.isnan(wire.decode_value(None))
    assert math.copysign(1.0, wire.decode_value(wire.encode_value(-0.0))) == 1.0
    for bad in ("nan", "inf", [], True):
        with pytest.raises(WireError):
            wire.decode_value(bad)
    assert wire.json_floats([1.0, math.nan, math.inf, -math.inf]) == [1.0, "NaN", "Infinity", "-Infinity"]
    assert wire.json_float(None) is None


def test_parse_points_matches_point_columns():
    points = [Point(1, "loss", 0.5, 10.0), Point(2, "loss", -0.0, 11.0), Point(2, "g", math.nan, 11.0, 3)]
    from_python = wire.point_columns(points)
    from_json = wire.parse_points([wire.encode_point(p) for p in points])
    assert list(from_python[0]) == list(from_json[0]) and list(from_python[1]) == list(from_json[1])
    assert [str(v) for v in from_python[2]] == [str(v) for v in from_json[2]] == ["0.5", "0.0", "nan"]
    assert list(from_python[4]) == list(from_json[4]) == [-1, -1, 3]


@pytest.mark.parametrize("point, field", [
    (["loss\n", 1, 1.0, 1.0], "metric"), (["", 1, 1.0, 1.0], "metric"), (["a\x00", 1, 1.0, 1.0], "metric"),
    (["v", -1, 1.0, 1.0], "step"), (["v", 1.5, 1.0, 1.0], "step"), (["v", 1, "nan", 1.0], "value"),
    (["v", 1, 1.0, "now"], "wall_time"), (["v", 1, 1.0, 1.0, -2], "rank"),
])
def test_parse_points_names_the_bad_field_and_index(point, field):
    with pytest.raises(WireError) as err:
        wire.parse_points([["ok", 0, 1.0, 1.0], point])
    assert err.value.field == field and err.value.index == 1 and "points[1]" in str(err.value)


def test_point_columns_refuses_what_the_api_refuses():
    with pytest.raises(WireError):
        wire.point_columns([Point(1, "loss\n", 1.0, 1.0)])
    with pytest.raises(WireError):
        wire.point_columns([Point(-1, "loss", 1.0, 1.0)])
