"""Rollout: the generation engines (native on policy/, or vLLM), the Trajectory record a
sampler hands the learner (token ids, sampler logprobs, routing ids, sampling masks), the
Parquet rollout store, and the Ray rollout workers."""
