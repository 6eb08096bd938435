"""Vocab-parallel token embedding and LM head: each rank holds a contiguous slice of the vocab.

The embedding zeroes rows of ids outside its slice and all-reduces; the LM head computes its slice
of the logits and gathers them on the driver only. The vocab is padded to a multiple of tp_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import ParallelContext, TensorSource, load_tensor
from engine.sampler import argmax_rows
from hal.backend import GGUF_BLOCK_TYPES, Backend, GGUFWeight


class VocabParallelEmbedding(nn.Module):
    """Token ids [num_tokens] -> embeddings [num_tokens, hidden_size]."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        backend: Backend,
        parallel: ParallelContext,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        per_rank = -(-vocab_size // parallel.tp_size)  # ceil: pad the vocab to tp_size
        self.vocab_size_padded = per_rank * parallel.tp_size
        self.vocab_start = parallel.tp_rank * per_rank
        self.vocab_stop = min(self.vocab_start + per_rank, vocab_size)  # real rows held here
        self.weight = nn.Parameter(
            torch.zeros(per_rank, hidden_size, device=backend.device, dtype=dtype),
            requires_grad=False,
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_stop)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)

    def load(self, source: TensorSource, name: str) -> None:
        rows = self.vocab_stop - self.vocab_start
        full = (self.vocab_size, self.hidden_size)
        if rows > 0:
            load_tensor(
                self.weight[:rows], source, name, full, 0, self.vocab_start, self.vocab_stop
            )


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [rows, hidden_size] -> logits [rows, vocab_size] on the driver (None elsewhere), in
    float32 or, with `float32=False`, in the GEMM's dtype (no [rows, vocab] cast kernel: the
    sampler widens only what it computes on, and an argmax orders the narrow values the same).

    With tied embeddings, `tie(embedding)` shares the embedding's (identically sharded) weight.
    A GGUF model on a backend that asks for it (`Backend.gguf_lm_head`) also keeps this rank's
    rows of the LM head's GGUF blocks (`load_gguf`), and the logits GEMM runs from them.
    """

    gguf: GGUFWeight | None = None

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(
                f"embedding: weight shape {tuple(embedding.weight.shape)} differs from the LM "
                f"head's {tuple(self.weight.shape)}"
            )
        self.weight = embedding.weight

    def load_gguf(self, source: TensorSource, name: str) -> bool:
        """Keep this rank's rows of GGUF tensor `name` as blocks prepared by the backend, for the
        logits GEMM (`Backend.gguf_lm_head`); the float weight stays for the embedding. Returns
        whether it did: not for a float tensor, a source without raw blocks, a backend that
        does not ask for it, or a rank holding only vocab padding."""
        read_blocks = getattr(source, "read_blocks", None)
        tensor_type = getattr(source, "tensor_type", None)
        rows = self.vocab_stop - self.vocab_start
        if not self.backend.gguf_lm_head or read_blocks is None or tensor_type is None or rows <= 0:
            return False
        qtype = tensor_type(name)
        if qtype not in GGUF_BLOCK_TYPES:
            return False
        blocks = read_blocks(name, 0, self.vocab_start, self.vocab_stop)
        weight = self.backend.prepare_gguf(blocks, qtype, rows, self.hidden_size, role="lm_head")
        for key, t in weight.tensors.items():  # parameters: the memory plan counts them
            param = nn.Parameter(t, requires_grad=False)
            self.register_parameter(f"gguf_{key}", param)
            weight.tensors[key] = param
        self.gguf = weight
        return True

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [rows, hidden] -> [rows, vocab_size_padded / tp_size], from the GGUF blocks when kept
        if self.gguf is None:
            return self.backend.linear(hidden, self.weight)
        logits = self.backend.gguf_linear(hidden, self.gguf)
        pad = self.weight.shape[0] - logits.shape[-1]  # this rank's vocab padding rows
        return F.pad(logits, (0, pad)) if pad else logits

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [rows, hidden_size] -> int64 [rows]: each row's argmax over the whole vocab, on
        every rank, without gathering the logits. Each rank takes the argmax of its real rows
        (first maximal index, NaN as the maximum), then one all_gather of (value, token id)
        pairs in float64 (both exact); the first rank holding the maximum wins, so the token is
        torch.argmax's over the gathered logits (ties to the lowest id)."""
        logits = self._logits(hidden)  # [rows, vocab_size_padded / tp_size]
        real = self.vocab_stop - self.vocab_start
        if self.parallel.tp_size == 1:
            return argmax_rows(logits[:, :real])
        if real > 0:
            local = logits[:, :real]
            index = argmax_rows(local)
            value = local.gather(1, index[:, None]).squeeze(1).double()
            index = index + self.vocab_start
        else:  # a rank holding only vocab padding: never chosen over an earlier rank
            value = torch.full((logits.shape[0],), float("-inf"), dtype=torch.float64,
                               device=logits.device)  # fmt: skip
            index = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        pairs = torch.stack((value, index.double()))[None]  # [1, 2, rows]
        every = self.parallel.all_gather(pairs, dim=0)  # [tp, 2, rows], rank order
        best = every[:, 0].argmax(dim=0, keepdim=True)  # [1, rows]: the first rank with the max
        return every[:, 1].gather(0, best).squeeze(0).long()

    def forward(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor | None:
        logits = self._logits(hidden)  # [rows, vocab_size_padded / tp_size]
        logits = self.parallel.gather(logits, dim=-1)
        if logits is None:
            return None
        logits = logits[..., : self.vocab_size]
        return logits.float() if float32 else logits
