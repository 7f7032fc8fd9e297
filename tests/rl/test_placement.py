"""Placement (rl/placement.py): the bundles each layout reserves, actors landing in their
bundles, a cluster that cannot hold the run failing at start with what it has, and a colocated
run training end to end."""

from __future__ import annotations

import os

import pytest

from rl.config import ConfigError, load_config

ray = pytest.importorskip("ray")

from rl.cli import main as cli  # noqa: E402
from rl.placement import bundles_for, reserve  # noqa: E402
from rollout.store import RolloutStore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIG = os.path.join(ROOT, "configs", "native-sparse.yaml")


def _cfg(*overrides):
    return load_config(CONFIG, list(overrides))


def test_the_bundles_of_each_layout():
    apart = _cfg(
        "ray.learner_workers=2", "rollout.workers=3", "ray.learner_cpus=2", "ray.learner_gpus=1",
        "ray.rollout_cpus=1", "ray.rollout_gpus=1",
    )  # fmt: skip
    bundles, learner, rollout = bundles_for(apart)
    assert bundles == [{"CPU": 2, "GPU": 1}] * 2 + [{"CPU": 1, "GPU": 1}] * 3
    assert learner == [0, 1] and rollout == [2, 3, 4]
    together = _cfg(
        "ray.placement=colocated", "ray.learner_workers=2", "rollout.workers=3",
        "ray.learner_cpus=2", "ray.learner_gpus=1", "ray.rollout_cpus=1", "ray.rollout_gpus=1",
    )  # fmt: skip
    bundles, learner, rollout = bundles_for(together)
    assert bundles == [{"CPU": 3, "GPU": 1}] * 3  # rank i and worker i share bundle i
    assert learner == [0, 1] and rollout == [0, 1, 2]


def test_colocated_runs_are_on_policy():
    with pytest.raises(ConfigError, match="max_staleness must be 0"):
        _cfg("ray.placement=colocated", "rollout.max_staleness=1")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_actors_land_in_their_bundles(cluster):
    cfg = _cfg(
        "ray.placement=colocated", "rollout.workers=2", "ray.learner_cpus=0.5",
        "ray.rollout_cpus=0.5",
    )  # fmt: skip
    placement = reserve(cfg)
    try:

        @ray.remote
        class Where:
            def group(self):
                return ray.util.get_current_placement_group().id.hex()

        want = placement.group.id.hex()
        actors = [Where.options(num_cpus=0.5, **placement.learner(0)).remote()]
        actors += [Where.options(num_cpus=0.5, **placement.rollout(s)).remote() for s in (0, 1)]
        assert ray.get([a.group.remote() for a in actors]) == [want] * 3
        for a in actors:
            ray.kill(a)
    finally:
        placement.remove()


def test_a_cluster_too_small_fails_at_start_saying_what_it_has(cluster):
    cfg = _cfg("ray.rollout_cpus=64", "ray.reserve_timeout_s=1")
    with pytest.raises(ConfigError, match=r"could not reserve 2 bundles .* the cluster has"):
        reserve(cfg)
    # Nothing stays reserved: the whole cluster can be had again.
    placement = reserve(_cfg("ray.learner_cpus=1", "ray.rollout_cpus=1"))
    placement.remove()


def test_a_colocated_run_trains(tmp_path, monkeypatch, small_run):
    monkeypatch.chdir(ROOT)
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [*small_run(run, cache, 2), "ray.placement=colocated", "ray.rollout_cpus=0.5"]
    assert cli(["train", CONFIG, *args, "ray.learner_cpus=0.5"]) == 0
    assert RolloutStore(run / "rollouts").steps() == [0, 1]
