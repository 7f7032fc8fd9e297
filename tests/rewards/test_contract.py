"""The plug-in contract: return forms, the loader, the registry and weighted combination."""

import math
import os
import sys

import pytest

import rewards
from rewards import Sample, Score, normalize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # so `rewards_test_verifiers:...` paths resolve (also in workers)

V = "rewards_test_verifiers"
SAMPLE = Sample("What is 6*7?", "It is \\boxed{42}", {"answer": "42"}, {"source": "unit"})


def test_sample_defaults_and_frozen():
    s = Sample("p", "r", {"answer": "1"})
    assert s.metadata == {} and Sample("p", "r", {}).metadata is not s.metadata
    with pytest.raises(AttributeError):
        s.response = "other"


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (1, Score(1.0)),
        (0.25, Score(0.25)),
        (True, Score(1.0)),
        ({"reward": 0.5, "f1": 0.3}, Score(0.5, {"f1": 0.3})),
        (None, Score(0.0, applied=False)),
    ],
)
def test_normalize_valid_returns(result, expected):
    assert normalize(result) == expected


@pytest.mark.parametrize(
    "garbage",
    [
        "1.0",
        float("nan"),
        math.inf,
        {"score": 1.0},
        {"reward": "1"},
        {"reward": 1, "x": "y"},
        [1.0],
    ],
)
def test_normalize_garbage_is_a_failure(garbage):
    score = normalize(garbage)
    assert score.reward == 0.0 and score.failure.startswith("garbage")


def test_get_registered_and_dotted():
    from rewards.code import verify_code
    from rewards.math import verify_math

    assert rewards.get("math") is verify_math
    assert rewards.get("code") is verify_code
    assert rewards.get(f"{V}:constant")(SAMPLE) == 1.0
    assert rewards.get(f"{V}:ScoreObject").score(SAMPLE) == 0.25  # classes are instantiated
    for name in rewards.REGISTRY:
        rewards.get(name)  # every registered entry resolves and follows the contract


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("maths", "did you mean 'math'"),
        ("agent:calculater", "did you mean 'agent:calculator'"),
        ("no_such_module_xyz:f", "cannot import"),
        (f"{V}:constnat", "did you mean 'constant'"),
        ("rewards.registry:REGISTRY", "not a verifier"),
    ],
)
def test_get_errors_are_clear(name, message):
    with pytest.raises((ValueError, TypeError), match=message):
        rewards.get(name)


def test_from_config_weighted_mean():
    combined = rewards.from_config(
        [
            {"name": "math", "weight": 1.0},
            {"name": f"{V}:constant", "weight": 0.5, "kwargs": {"value": 0.0}, "label": "zero"},
        ]
    )
    score = rewards.score_batch(combined, [SAMPLE])[0]
    assert score.reward == pytest.approx(1.0 / 1.5)
    assert score.subscores["math"] == 1.0 and score.subscores["math/extracted"] == 1.0
    assert score.subscores["zero"] == 0.0


def test_from_config_renormalises_over_applying_parts():
    combined = rewards.from_config(
        [{"name": f"{V}:only_math", "weight": 3.0}, {"name": f"{V}:by_length", "weight": 1.0}]
    )
    not_math = Sample("p", "x" * 5, {"io": []})
    math_sample = Sample("p", "x" * 5, {"answer": "1"})
    s1, s2 = rewards.score_batch(combined, [not_math, math_sample])
    assert s1.reward == pytest.approx(0.5)  # only by_length applies: its reward, unscaled
    assert s2.reward == pytest.approx((3.0 * 1.0 + 0.5) / 4.0)
    assert f"{V}:only_math" not in s1.subscores and s1.subscores[f"{V}:by_length/chars"] == 5.0


def test_no_part_applies():
    combined = rewards.from_config([{"name": f"{V}:only_math"}])
    score = rewards.score_batch(combined, [Sample("p", "r", {})])[0]
    assert not score.applied and score.reward == 0.0 and score.failure is None


def test_failing_part_counts_as_zero_and_is_recorded():
    combined = rewards.from_config([{"name": f"{V}:raises"}, {"name": f"{V}:async_half"}])
    score = rewards.score_batch(combined, [SAMPLE])[0]
    assert score.reward == pytest.approx(0.25)
    assert "raises" in score.failure and "ValueError: boom" in score.failure


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"name": "math", "wieght": 1.0}], "unknown key 'wieght'; did you mean 'weight'"),
        ([{"nmae": "math"}], "did you mean 'name'"),
        ([{"weight": 1.0}], "missing 'name'"),
        ([{"name": "math", "weight": 0}], "must be a number > 0"),
        ([{"name": "math", "weight": "high"}], "must be a number > 0"),
        ([{"name": "code", "kwargs": {"all_or_nothin": True}}], "did you mean 'all_or_nothing'"),
        ([{"name": "math", "kwargs": [1]}], "must be a mapping"),
        ([{"name": "math"}, {"name": "math"}], "duplicate label"),
        ([], "empty"),
        (["math"], "expected a mapping"),
    ],
)
def test_from_config_errors_name_the_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        rewards.from_config(spec)


def test_combine_helper_and_object_verifiers():
    from rewards_test_verifiers import by_length, score_object

    combined = rewards.combine((by_length, 1.0), (score_object, 1.0))
    score = rewards.score_batch(combined, [Sample("p", "x" * 10, {})])[0]
    assert score.reward == pytest.approx((1.0 + 0.25) / 2)
    assert set(score.subscores) == {"by_length", "by_length/chars", "part1"}
