"""keeprl's top package: the run config, the algorithm maths (advantages, loss), the learner,
the trainer loop, replay of logged steps, experiment tracking and the `keeprl` command line.

It sits above every other package (policy, kernels, rollout, rewards) and nothing imports it.
"""
