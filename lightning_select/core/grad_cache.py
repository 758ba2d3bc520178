"""Gradient-cached contrastive steps (GradCache; sentence-transformers' Cached* losses).

``training_step`` runs on chunks without grad; the loss and its gradients w.r.t. the embeddings are
computed on the full batch; during ``backward`` each chunk is re-embedded with grad (replaying its
RNG state) and back-propagated. Peak activation memory is that of one chunk, and loss and gradients
equal the plain mode.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_select.core.batch import batch_size_of, select_batch
from lightning_select.core.context import SelectionError
from lightning_select.rules.contrastive import EmbeddingOutput


class GradCache:
    """Chunked, gradient-cached embedding: see ``SelectionEngine(embedding_chunk_size=...)``."""

    def __init__(self, output: EmbeddingOutput, leaves: list[Tensor], chunks: list[tuple[Tensor, Any]],
                 step: Callable[[Any], Any], batch: Any, size: int, autocast: tuple[str, bool, torch.dtype]) -> None:
        self.output, self.leaves, self.chunks = output, leaves, chunks
        self.step, self.batch, self.size = step, batch, size
        self.autocast = autocast

    @classmethod
    def embed(cls, step: Callable[[Any], Any], batch: Any, chunk_size: int) -> "GradCache":
        """Run ``step`` on chunks of ``batch`` without grad; the output's embeddings are leaves for ``attach``."""
        size = batch_size_of(batch)
        outs, chunks = [], []
        with torch.no_grad():
            for start in range(0, size, chunk_size):
                rows = torch.arange(start, min(size, start + chunk_size))
                rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
                out = step(select_batch(batch, rows, size))
                if not isinstance(out, EmbeddingOutput):
                    raise SelectionError(
                        "The gradient-cached mode (embedding_chunk_size / mini_batch_size) needs training_step to "
                        f"return an EmbeddingOutput, but it returned {type(out).__name__}."
                    )
                outs.append(out)
                chunks.append((rows, rng))
        anchor = torch.cat([o.anchor for o in outs]).requires_grad_(True)
        positive = torch.cat([o.positive for o in outs]).requires_grad_(True)
        negatives = None
        if outs[0].negatives is not None:
            negatives = torch.cat([o.negatives for o in outs]).requires_grad_(True)  # type: ignore[misc]
        leaves = [t for t in (anchor, positive, negatives) if t is not None]
        device = anchor.device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        output = EmbeddingOutput(anchor, positive, negatives, outs[0].temperature)
        return cls(output, leaves, chunks, step, batch, size, autocast)

    def attach(self, loss: Tensor, module: torch.nn.Module) -> Tensor:
        """Cache d loss / d embeddings now; return a leaf whose backward re-embeds chunk by chunk."""
        embedding_grads = torch.autograd.grad(loss, self.leaves)
        params = [p for p in module.parameters() if p.requires_grad]
        cache = self

        def backward_hook(grad_output: Tensor) -> None:
            totals: list[Optional[Tensor]] = [None] * len(params)
            device, enabled, dtype = cache.autocast
            for rows, (cpu_rng, cuda_rng) in cache.chunks:
                saved = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda_rng is not None else None)
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    out = cache.step(select_batch(cache.batch, rows, cache.size))
                torch.set_rng_state(saved[0])
                if saved[1] is not None:
                    torch.cuda.set_rng_state_all(saved[1])
                pieces = [out.anchor, out.positive] + ([out.negatives] if out.negatives is not None else [])
                grads = [g[rows.to(g.device)] * grad_output for g in embedding_grads]
                # autograd.grad does not run AccumulateGrad, so DDP's hooks fire once, below, not per chunk
                chunk_grads = torch.autograd.grad(pieces, params, grads, allow_unused=True)
                for k, g in enumerate(chunk_grads):
                    if g is not None:
                        totals[k] = g if totals[k] is None else totals[k] + g  # type: ignore[operator]
            with torch.enable_grad():  # hooks run with grad mode off
                surrogate = sum((p * g).sum() for p, g in zip(params, totals) if g is not None)
            if isinstance(surrogate, Tensor):
                surrogate.backward()

        leaf = loss.detach().requires_grad_(True)
        leaf.register_hook(backward_hook)
        return leaf
