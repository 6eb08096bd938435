"""The per-step batch the runner builds and passes down explicitly (no hidden globals)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """One model step over packed sequences, in the attention op's layout.

    input_ids, positions, slot_mapping: int64 [num_tokens], packed sequence after sequence;
    query_start_loc: int32 [num_seqs + 1]; seq_lens: int32 [num_seqs] (total KV length, new tokens
    included); block_tables: int32 [num_seqs, max_blocks] (unused entries 0); logits_indices:
    int64 [num_rows], the token rows whose logits the sampler needs (usually each sequence's last).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int
    max_seq_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def to(self, device: torch.device | str) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            seq_lens=self.seq_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            logits_indices=self.logits_indices.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
        )
