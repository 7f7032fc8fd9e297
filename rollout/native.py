"""The native rollout engine: batched generation with the policy itself, in plain torch.

It decodes with the policy's incremental cache, so DeepSeek Sparse Attention is active (the
indexer's top-k over the cached keys), which makes it the only engine that rolls out a sparse
DSA policy on a CPU, and the reference the vLLM engine is compared against. Prompts are
left-padded into one batch; every step samples all rows with `rollout.sampling.sample`, which
records the kept ids; the routing of every token comes from the model's own output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy import Transformer, load_pretrained

from .sampling import sample
from .trajectory import Sampling, Trajectory, compact_routing


class NativeEngine:
    """Rollouts from a policy checkpoint (or a live Transformer) on `device`.

    max_batch_size bounds the sequences decoded together (prompts x n are split into
    batches of at most that many rows). attention: DSA's implementation (policy/attention.py;
    on CUDA "auto" prefills and decodes through the sparse kernels).
    """

    name = "native"

    def __init__(
        self,
        checkpoint_dir: str | Path | Transformer,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 64,
        attention: str | None = None,
    ) -> None:
        if isinstance(checkpoint_dir, Transformer):
            self.model = checkpoint_dir.to(device=device, dtype=dtype)
        else:
            self.model = load_pretrained(checkpoint_dir, device=device, dtype=dtype)
        if attention is not None:  # else the model's own (a loaded checkpoint's: "auto")
            self.model.attention = attention
        self.model.eval()
        self.device, self.dtype = torch.device(device), dtype
        self.max_batch_size = max_batch_size
        self.weight_version = 0

    def release(self) -> bool:
        """Move the weights to host memory and return the device's cached blocks, so a learner
        colocated on the same GPU has them (rl/placement.py); False on the CPU, where the
        engine holds no device memory."""
        if self.device.type != "cuda":
            return False
        self.model.to("cpu")
        torch.cuda.empty_cache()
        return True

    def resume(self) -> bool:
        """Bring the weights back to the device after release."""
        if self.device.type != "cuda":
            return False
        self.model.to(self.device)
        return True

    def update_weights(self, source: Any, version: int) -> str:
        """Load a policy state dict or a checkpoint directory into the live model."""
        if isinstance(source, (str, Path)):
            source = load_pretrained(source, dtype=self.dtype).state_dict()
        self.model.load_state_dict(source)
        self.weight_version = version
        return "in-place"

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, n: int = 1
    ) -> list[Trajectory]:
        """n responses per prompt, prompt-major order."""
        longest = max((len(p) for p in prompts), default=0) + sampling.max_tokens
        if longest > self.model.args.max_position_embeddings:
            raise ValueError(
                f"prompt + max_tokens = {longest} exceeds max_position_embeddings "
                f"{self.model.args.max_position_embeddings}"
            )
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = torch.Generator(self.device)
        if sampling.seed is None:
            gen.seed()  # fresh entropy for this generator only; the global RNG is untouched
        else:
            gen.manual_seed(sampling.seed)
        rows = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(n)]
        out: list[Trajectory] = []
        for start in range(0, len(rows), self.max_batch_size):
            out.extend(
                self._generate_batch(rows[start : start + self.max_batch_size], sampling, gen)
            )
        return out

    @torch.no_grad()
    def _generate_batch(
        self, rows: list[tuple[int, list[int]]], sampling: Sampling, gen: torch.Generator
    ) -> list[Trajectory]:
        b, width = len(rows), max(len(p) for _, p in rows)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.bool)
        for r, (_, p) in enumerate(rows):  # left padding: every row's last token is aligned
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = self.model.new_cache(b, width + sampling.max_tokens)
        step_out = self.model(ids, cache=cache, attention_mask=mask)
        prompt_routing = step_out.routing.cpu()  # one device-to-host copy, not one per row
        routing = [[prompt_routing[r, width - len(p) :]] for r, (_, p) in enumerate(rows)]
        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        kept: list[list[np.ndarray]] = [[] for _ in rows]
        finish = ["length"] * b
        active = torch.ones(b, dtype=torch.bool)
        stop = torch.tensor(sampling.stop_token_ids or [-1])
        for step in range(sampling.max_tokens):
            s = sample(
                step_out.logits[:, -1],
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                generator=gen,
            )
            s_tok, s_lp, s_kept = s.tokens.cpu(), s.logprobs.cpu(), s.kept_ids.cpu()
            for r in active.nonzero().flatten().tolist():
                tokens[r].append(int(s_tok[r]))
                logps[r].append(float(s_lp[r]))
                kept[r].append(s_kept[r][s_kept[r] >= 0].numpy().astype(np.int32))
            stopped = active & torch.isin(s_tok, stop)
            for r in stopped.nonzero().flatten().tolist():
                finish[r] = "stop"
            active &= ~stopped
            if not active.any() or step == sampling.max_tokens - 1:
                break
            # Finished rows keep decoding (batch shapes stay fixed); their outputs are ignored.
            step_out = self.model(s.tokens[:, None], cache=cache)
            step_routing = step_out.routing.cpu()
            for r in active.nonzero().flatten().tolist():
                routing[r].append(step_routing[r])
        return [
            Trajectory(
                prompt_ids=p,
                response_ids=tokens[r],
                logprobs=np.asarray(logps[r], dtype=np.float32),
                routing=compact_routing(torch.cat(routing[r]).numpy()),
                kept_ids=kept[r],
                sampling=sampling,
                finish_reason=finish[r],
                engine=self.name,
                weight_version=self.weight_version,
                prompt_index=i,
            )
            for r, (i, p) in enumerate(rows)
        ]
