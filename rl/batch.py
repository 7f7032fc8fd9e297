"""The learner's input: one GRPO batch, defined once.

Every per-token field is aligned with `input_ids` (prompt + response, right-padded): entry p
describes token p. So `old_logprobs[b, p]` is the sampler's log pi_old of token p, `kept_ids[b, p]`
the ids its sampler kept when drawing token p, `routing[b, p]` the experts token p was routed to
when the sampler's model processed it. Only response positions carry log-probs and kept ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from rollout.episode import episode_loss_mask


@dataclass(kw_only=True)
class Batch:
    """A GRPO batch of B sequences, T = the longest prompt + response.

    input_ids [B, T] long; prompt_lens, response_lens [B] long; old_logprobs [B, T] float32
    (0 outside responses); routing [B, T, n_moe_layers, top_k] long or None (Keep Routing);
    kept_ids [B, T, K] long, -1 padded, or None (Keep Sampling Mask; a position whose row is
    all -1 was not truncated); rewards [B] float32; group_ids [B] long; temperature: the
    sampler's, which the learner's log-probs must use too.
    """

    input_ids: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    routing: torch.Tensor | None = None
    kept_ids: torch.Tensor | None = None
    temperature: float = 1.0
    # [B, T] bool: the tokens the loss is about, where that is not simply every response
    # token (a multi-turn episode: the model's own turns, not the tool answers between them)
    loss_mask: torch.Tensor | None = None
    # [B] long: the episode of each row, where one episode spans several rows (an agent
    # episode continued in new segments after context overflow); None: a row per episode
    episode_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in ("prompt_lens", "response_lens", "rewards", "group_ids"):
            if tuple(getattr(self, name).shape) != (b,):
                raise ValueError(f"Batch.{name} must have shape [{b}]")
        if self.episode_ids is not None and tuple(self.episode_ids.shape) != (b,):
            raise ValueError(f"Batch.episode_ids must have shape [{b}]")
        for name in ("old_logprobs", "routing", "kept_ids", "loss_mask"):
            v = getattr(self, name)
            if v is not None and tuple(v.shape[:2]) != (b, t):
                raise ValueError(f"Batch.{name} must start with [B, T] = [{b}, {t}]")
        if bool((self.prompt_lens < 1).any()):
            raise ValueError("every sequence needs a prompt of at least one token")
        if bool(((self.prompt_lens + self.response_lens) > t).any()):
            raise ValueError("prompt_lens + response_lens exceeds input_ids' length")

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.prompt_lens + self.response_lens

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, T] bool: real (prompt or response) tokens."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return pos < self.lengths.unsqueeze(1)

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, T] bool: the tokens the loss is about: the response tokens, or loss_mask's."""
        if self.loss_mask is not None:
            return self.loss_mask.bool() & self.attention_mask
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (pos >= self.prompt_lens.unsqueeze(1)) & self.attention_mask

    @property
    def routed_mask(self) -> torch.Tensor:
        """[B, T] bool: tokens whose routing the sampler recorded (all but each row's last,
        which never passed through the sampler's model)."""
        mask = self.attention_mask.clone()
        mask[torch.arange(self.size, device=mask.device), self.lengths - 1] = False
        return mask

    def select(self, index: torch.Tensor) -> Batch:
        """Rows `index`, trimmed to their longest sequence (for micro-batches)."""
        t = int(self.lengths[index].max())
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[index]
                if v.dim() >= 2:
                    v = v[:, :t]
            out[f.name] = v
        return replace(self, **out)

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @classmethod
    def from_trajectories(
        cls,
        trajectories: Sequence[Any],
        rewards: Sequence[float],
        group_ids: Sequence[int],
        *,
        pad_id: int = 0,
    ) -> Batch:
        """A batch from rollout Trajectories (any engine): ids, pi_old, routing, kept ids. A
        stored agent episode's segment (rollout.episode) gets its loss mask back from its
        turns, so only its generated turns are compared or trained, not the tool answers."""
        temps = {t.sampling.temperature for t in trajectories}
        if len(temps) != 1:
            raise ValueError(f"one batch needs one sampling temperature, got {sorted(temps)}")
        temperature = temps.pop() or 1.0  # greedy log-probs are the plain softmax's
        batch = cls.from_sequences(
            [t.prompt_ids for t in trajectories],
            [t.response_ids for t in trajectories],
            [t.logprobs.tolist() for t in trajectories],
            rewards,
            group_ids,
            routing=[torch.from_numpy(t.routing.astype("int64")) for t in trajectories],
            kept_ids=[[k.tolist() for k in t.kept_ids] for t in trajectories],
            temperature=temperature,
            pad_id=pad_id,
        )
        masks = [episode_loss_mask(t) for t in trajectories]
        if all(m is None for m in masks):
            return batch
        return batch.with_loss_mask(
            [
                # a single-turn row beside episodes: its response is its turn
                m if m is not None else [False] * len(t.prompt_ids) + [True] * len(t.response_ids)
                for t, m in zip(trajectories, masks, strict=True)
            ]
        )

    @classmethod
    def from_episodes(
        cls,
        episodes: Sequence[Any],
        group_ids: Sequence[int],
        *,
        temperature: float = 1.0,
        pad_id: int = 0,
    ) -> Batch:
        """A batch from multi-turn episodes (rollout.episode.Episode): a row per segment (one
        unless an overflow strategy continued the episode), the loss on its generated turns
        only (loss_mask), pi_old and kept ids at those positions, routing at every position,
        the episode's reward on each of its rows and episode_ids tying them together."""
        rows = [(i, seg) for i, ep in enumerate(episodes) for seg in ep.segments]
        plens = [seg.spans[0][2] for _, seg in rows]  # each segment's first span
        batch = cls.from_sequences(
            [seg.token_ids[:n] for (_, seg), n in zip(rows, plens, strict=True)],
            [seg.token_ids[n:] for (_, seg), n in zip(rows, plens, strict=True)],
            [seg.logprobs[n:] for (_, seg), n in zip(rows, plens, strict=True)],
            [float(episodes[i].reward or 0.0) for i, _ in rows],
            [group_ids[i] for i, _ in rows],
            routing=[torch.from_numpy(seg.routing.astype("int64")) for _, seg in rows],
            kept_ids=[
                [k.tolist() for k in seg.kept_ids[n:]]
                for (_, seg), n in zip(rows, plens, strict=True)
            ],
            temperature=temperature or 1.0,
            pad_id=pad_id,
        )
        episode_ids = torch.tensor([i for i, _ in rows], dtype=torch.long)
        batch = batch.with_loss_mask([seg.loss_mask for _, seg in rows])
        return replace(batch, episode_ids=episode_ids)

    def with_loss_mask(self, masks: Sequence[Sequence[bool]]) -> Batch:
        """This batch with loss_mask from one list per row over its tokens (prompt first;
        the padding after a row's tokens stays False)."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for r, m in enumerate(masks):
            mask[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return replace(self, loss_mask=mask)

    @classmethod
    def from_sequences(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        old_logprobs: Sequence[Sequence[float]],
        rewards: Sequence[float],
        group_ids: Sequence[int],
        *,
        routing: Sequence[torch.Tensor] | None = None,
        kept_ids: Sequence[Sequence[Sequence[int]]] | None = None,
        temperature: float = 1.0,
        pad_id: int = 0,
    ) -> Batch:
        """Pad ragged per-sequence lists into a Batch.

        routing[i]: [len_i or len_i - 1, n_moe_layers, top_k] (the final token may be missing:
        it never passed through the sampler's model; it is filled with experts 0..k-1, which
        only that token's own, unused, output sees). kept_ids[i]: per response token a list.
        """
        b = len(prompts)
        lens = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        t = max(lens)
        ids = torch.full((b, t), pad_id, dtype=torch.long)
        old = torch.zeros(b, t, dtype=torch.float32)
        for i, (p, r, lp) in enumerate(zip(prompts, responses, old_logprobs, strict=True)):
            if len(lp) != len(r):
                raise ValueError(f"sequence {i}: {len(lp)} log-probs for {len(r)} response tokens")
            ids[i, : lens[i]] = torch.tensor([*p, *r], dtype=torch.long)
            old[i, len(p) : lens[i]] = torch.tensor(lp, dtype=torch.float32)
        route = None
        if routing is not None:
            n_moe, k = routing[0].shape[1:]
            route = torch.arange(k).expand(b, t, n_moe, k).clone()
            for i, r in enumerate(routing):
                route[i, : r.shape[0]] = torch.as_tensor(r, dtype=torch.long)
        kept = None
        if kept_ids is not None:
            width = max((len(k) for seq in kept_ids for k in seq), default=0)
            kept = torch.full((b, t, max(width, 1)), -1, dtype=torch.long)
            for i, seq in enumerate(kept_ids):
                for j, k in enumerate(seq):
                    kept[i, len(prompts[i]) + j, : len(k)] = torch.as_tensor(k, dtype=torch.long)
        return cls(
            input_ids=ids,
            prompt_lens=torch.tensor([len(p) for p in prompts]),
            response_lens=torch.tensor([len(r) for r in responses]),
            old_logprobs=old,
            rewards=torch.tensor(rewards, dtype=torch.float32),
            group_ids=torch.tensor(group_ids, dtype=torch.long),
            routing=route,
            kept_ids=kept,
            temperature=temperature,
        )
