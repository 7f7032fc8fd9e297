"""The examples/custom_verifier plug-in, loaded through its YAML file as a user would."""

import os

import pytest
import yaml

import rewards
from rewards import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YAML_PATH = os.path.join(ROOT, "examples", "custom_verifier", "rewards.yaml")


@pytest.fixture(autouse=True)
def importable_examples(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # the example is imported by its dotted path


def load_config():
    with open(YAML_PATH) as f:
        return yaml.safe_load(f)["rewards"]["verifiers"]


def test_yaml_config_combines_math_and_the_custom_verifier():
    verifier = rewards.from_config(load_config())
    samples = [
        Sample("1+1?", "<answer>\\boxed{2}</answer>", {"answer": "2"}),
        Sample("1+1?", "<answer>" + "very " * 40 + "\\boxed{3}</answer>", {"answer": "2"}),
        Sample("1+1?", "it is 2", {"answer": "2"}),
        Sample("poem", "<answer>roses</answer>", {}, {"free_form": True}),
    ]
    short_right, long_wrong, untagged, free = rewards.score_batch(verifier, samples)
    assert short_right.reward == pytest.approx(1.0)
    assert short_right.subscores == {
        "math": 1.0,
        "math/extracted": 1.0,
        "concise": 1.0,
        "concise/words": 1.0,
    }
    assert long_wrong.reward == pytest.approx(0.2 * 0.5 / 1.2)
    assert untagged.reward == pytest.approx(1.0 / 1.2)
    assert not free.applied  # neither verifier applies to a free-form sample


def test_the_function_directly():
    fn = rewards.get("examples.custom_verifier.verifier:concise_answer")
    assert fn(Sample("", "<answer>a b c</answer>", {}), max_words=2) == {
        "reward": 0.5,
        "words": 3.0,
    }
    assert fn(Sample("", "<final>a</final>", {}), tag="final")["reward"] == 1.0


def test_a_misspelt_yaml_key_fails_with_the_closest_name():
    config = load_config()
    config[1]["kwargs"] = {"max_word": 30}
    with pytest.raises(
        ValueError, match="rewards\\[1\\].kwargs: unknown key 'max_word'; did you mean 'max_words'"
    ):
        rewards.from_config(config)
