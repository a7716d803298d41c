"""The networks: a two-hidden-layer MLP for MNIST and a word-level LSTM language model.

Each splits into the embedding network f (whose output is the memory key) and the output
network g (what local adaptation changes).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "LSTMLM"]


class MLP(nn.Module):
    """784 -> hidden -> hidden -> classes with ReLUs; ``features`` is f, ``out`` is g (hidden keys)."""

    def __init__(self, hidden: int, classes: int = 10, inputs: int = 784) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class LSTMLM(nn.Module):
    """Embedding -> LSTM -> dropout -> softmax layer ``decoder`` (g); the LSTM output is the key."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)

    def hidden_states(self, tokens: torch.Tensor, state=None):
        """(batch, time) ids -> ((batch, time, hidden) outputs, new state)."""
        out, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return self.drop(out), state

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.hidden_states(tokens, state)
        return self.decoder(out), state
