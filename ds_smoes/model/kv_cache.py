"""The built-in decoder's KV cache: per block the keys and values, and the keys' attention modality scores.

Generation feeds the prompt once (the prefill) and then one token per step; each step's attention reads the
earlier positions' keys and values from here instead of recomputing them.  The attention score (docs/method.md,
"Soft modality scores") mixes the keys' scores at the block's input, M~ = A @ M^(l); a position's M^(l) depends only on
the positions up to it (causal attention), so the scores written when the position was fed are those a full
forward would compute again: they are kept per block next to the keys.

Preallocated, not concatenated: `generate` knows the longest sequence (prompt + max_new_tokens - 1 fed tokens)
before the first forward, so each block's buffers are made once, at the prefill, and every step writes its
token in place at a host-known offset (no device read).  Concatenating would copy the whole cache at every
step, O(U) per token and O(U^2) per sequence; the views handed to attention (`[..., :U, :]`) keep the
head dimension contiguous, which the fused kernels need.

Visual token pruning (issue 19, `ds_smoes.compress.in_llm`): the prefill removes vision tokens before
block L, once.  Blocks before L cache every prompt position, blocks from L on only the kept ones, packed: two
sets of key positions, of different lengths and padding.  `KVCache.valid_BU` describes the first set (every
block's when nothing is pruned), `KVCache.pruned` the second; a decode step appends its token to both and
`keys_of(block)` says which one a block reads.

Shapes: B batch, A heads, U key positions (cached + current), T positions of this forward, d head dim,
M modalities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """One decoder block's keys, values and keys' scores, buffers of `capacity` positions made on first write."""
    capacity: int
    length: int = 0                                    # positions written so far
    key_BAUd: torch.Tensor | None = None
    value_BAUd: torch.Tensor | None = None
    scores_BUM: torch.Tensor | None = None             # the keys' scores at this block's input (attention score)

    def update(self, key_BATd: torch.Tensor, value_BATd: torch.Tensor, scores_BTM: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append this forward's T positions; return the U = length + T positions' (keys, values, scores)."""
        b, a, t, d = key_BATd.shape
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {end}")
        if self.key_BAUd is None:
            self.key_BAUd = key_BATd.new_empty(b, a, self.capacity, d)
            self.value_BAUd = value_BATd.new_empty(b, a, self.capacity, d)
            if scores_BTM is not None:
                self.scores_BUM = scores_BTM.new_empty(b, self.capacity, scores_BTM.shape[-1])
        self.key_BAUd[:, :, start:end] = key_BATd
        self.value_BAUd[:, :, start:end] = value_BATd
        if scores_BTM is not None:
            self.scores_BUM[:, start:end] = scores_BTM
        self.length = end
        return (self.key_BAUd[:, :, :end], self.value_BAUd[:, :, :end],
                self.scores_BUM[:, :end] if scores_BTM is not None else None)


@dataclass
class KeyValidity:
    """Which of a set of blocks' cached key positions are tokens (a buffer of `capacity` positions) and whether one
    is padding (host-side: a decode step then needs a key mask)."""
    capacity: int
    length: int = 0
    valid_BU: torch.Tensor | None = None
    padded: bool = False

    def extend(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """Append this forward's tokens' validity; return the U keys' validity (a view of the buffer)."""
        b, t = valid_BT.shape
        if self.valid_BU is None:
            self.valid_BU = valid_BT.new_zeros(b, self.capacity, dtype=torch.bool)
        end = self.length + t
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {end}")
        self.valid_BU[:, self.length:end] = valid_BT
        self.length = end
        return self.valid_BU[:, :end]


@dataclass
class KVCache:
    """The decoder's cache: one `LayerCache` per block, the keys' validity and each row's next position id.

    `padded` (host-side, set by the prefill): some cached key is padding, so a decode step needs a key mask;
    without padding the fused kernel runs without one (one query sees every key)."""
    layers: list[LayerCache]
    keys: KeyValidity                                  # every cached position (the blocks before any pruning point)
    position_B: torch.Tensor | None = None             # the position id of each row's next token
    pruned_from: int | None = None                     # the first block whose keys are the pruned set
    pruned: KeyValidity | None = None                  # the kept positions' validity, blocks pruned_from..

    @classmethod
    def empty(cls, num_layers: int, capacity: int) -> "KVCache":
        return cls([LayerCache(capacity) for _ in range(num_layers)], KeyValidity(capacity))

    @property
    def length(self) -> int:
        return self.keys.length

    @property
    def padded(self) -> bool:
        return self.keys.padded

    @padded.setter
    def padded(self, value: bool) -> None:
        self.keys.padded = value

    def prune(self, block: int, valid_BT: torch.Tensor, padded: bool) -> None:
        """At the prefill: blocks `block`.. cache the packed kept positions `valid_BT` (`padded`: one is padding)."""
        if self.pruned is not None:
            raise ValueError(f"the KV cache is pruned from block {self.pruned_from} already: generation prunes once")
        self.pruned_from, self.pruned = block, KeyValidity(self.keys.capacity, padded=padded)
        self.pruned.extend(valid_BT)

    def keys_of(self, block: int) -> tuple[torch.Tensor, bool]:
        """(the U keys' validity, whether one is padding) of the set of key positions `block` caches."""
        keys = self.pruned if self.pruned is not None and block >= self.pruned_from else self.keys
        return keys.valid_BU[:, :keys.length], keys.padded

    def extend(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """Append this forward's tokens' validity (to the pruned set too, once there is one); return the U keys'
        validity of the blocks before the pruning point (a view of the buffer)."""
        if self.pruned is not None:
            self.pruned.extend(valid_BT)
        return self.keys.extend(valid_BT)
