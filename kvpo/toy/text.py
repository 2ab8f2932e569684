"""The toy text encoder: a word tokenizer over the world's vocabulary and a learned embedding.

Stands in for Wan's umT5: ``ToyTextEncoder(prompts) -> [P, max_len, text_dim]`` states that the
causal model's text projection consumes. Each token is ``embedding[token] + position[i]``,
layer-normalised; padding positions are exactly zero (Wan zero-pads its 512 text tokens the same
way). The encoder's weights are part of the pretrained toy model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kvpo.toy.prompts import COLOURS, DIRECTIONS, SHAPES

PAD, UNK = 0, 1
VOCAB: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "a",
    "an",
    "the",
    "moves",
    "it",
    "turns",
    "and",
    "then",
    *COLOURS,
    *SHAPES,
    *DIRECTIONS,
)


class WordTokenizer:
    """Lower-cased words to ids of :data:`VOCAB` (unknown words -> ``<unk>``), padded."""

    def __init__(self, max_len: int = 8):
        self.max_len = max_len
        self.ids = {word: i for i, word in enumerate(VOCAB)}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """prompts: P strings -> token ids [P, max_len] int64 (PAD after the last word)."""
        out = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)
        for p, text in enumerate(prompts):
            words = re.findall(r"[a-z]+", text.lower())
            if len(words) > self.max_len:
                raise ValueError(
                    f"prompt {text!r} has {len(words)} words, the tokenizer takes at most "
                    f"{self.max_len} (give one segment sentence per call)"
                )
            ids = [self.ids.get(w, UNK) for w in words]
            out[p, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class ToyTextEncoder(nn.Module):
    """Token + position embedding, layer norm, zero at padding.

    Args:
        text_dim: width of the states (the causal model's ``text_dim``).
        max_len: tokens per prompt.
    """

    def __init__(self, text_dim: int = 32, max_len: int = 8):
        super().__init__()
        self.tokenizer = WordTokenizer(max_len)
        self.token = nn.Embedding(len(VOCAB), text_dim)
        self.position = nn.Parameter(torch.zeros(max_len, text_dim))
        self.norm = nn.LayerNorm(text_dim)
        nn.init.normal_(self.token.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """P segment sentences -> states [P, max_len, text_dim] fp32 on the parameters' device."""
        ids = self.tokenizer(prompts).to(self.position.device)
        states = self.norm(self.token(ids) + self.position)
        return states * (ids != PAD).unsqueeze(-1).to(states.dtype)
