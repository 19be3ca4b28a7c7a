"""An auxiliary objective that teaches the T5 to bind each shape's colour to its position words.

The default model draws one-shape captions far better than two-shape ones: with two shapes it swaps their
colours or drops one, because the bit loss alone rarely tells the T5 which colour word goes with which position
words. This objective says it directly. A probe reads the T5 features the way the transformer's cross-attention
does (learned queries, one linear key and value projection, a softmax over the caption's tokens): one query per
named position asks for the colour of the shape there (or none), two more for the background's top and bottom
colours. The probe is discarded after training; only the T5 it shaped is saved.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from . import shapes
from . import text_encoder_training as te

_NONE = len(shapes.COLORS)  # class of a position without a shape
_SHAPE = re.compile(r"an? (?P<size>\w+) (?P<color>\w+) (?P<kind>\w+) at the (?P<position>[\w ]+)")
_BACKGROUND = re.compile(r"an? (?P<first>\w+)(?: to (?P<second>\w+) gradient)? background")


def parse_caption(text: str) -> shapes.Scene:
    """The scene a caption from `shapes.caption` describes; ValueError on any other text."""
    head, sep, tail = text.rpartition(" on ")
    bg = _BACKGROUND.fullmatch(tail)
    if not sep or bg is None:
        raise ValueError(f"not a shapes caption (no background clause): {text!r}")
    found = []
    for clause in head.split(" and "):
        m = _SHAPE.fullmatch(clause)
        if m is None:
            raise ValueError(f"not a shapes caption (clause {clause!r}): {text!r}")
        found.append(shapes.Shape(kind=m["kind"], color=m["color"], position=m["position"], size=m["size"]))
    background = (bg["first"],) if bg["second"] is None else (bg["first"], bg["second"])
    return shapes.Scene(shapes=tuple(found), background=background)


def layout_labels(scene: shapes.Scene) -> torch.Tensor:
    """(11,) class per probe query: colour index at each of the 9 positions (or none), background top, bottom."""
    labels = [_NONE] * len(shapes.POSITIONS)
    names = list(shapes.POSITIONS)
    for s in scene.shapes:
        labels[names.index(s.position)] = shapes.COLORS.index(s.color)
    top, bottom = scene.background[0], scene.background[-1]
    return torch.tensor(labels + [shapes.COLORS.index(top), shapes.COLORS.index(bottom)])


def caption_labels(captions: list[str]) -> torch.Tensor:
    """(B, 11) probe targets of shapes captions: the training batches hold captions, not scenes."""
    return torch.stack([layout_labels(parse_caption(c)) for c in captions])


class BindingProbe(nn.Module):
    """Learned queries over T5 features, read like a cross-attention, each classified into a colour."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(shapes.POSITIONS) + 2
        self.queries = nn.Parameter(torch.randn(n, channels, generator=g) * channels ** -0.5)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.classify = nn.Linear(channels, _NONE + 1)
        with torch.no_grad():
            for lin in (self.key, self.value, self.classify):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * lin.in_features ** -0.5)
                lin.bias.zero_()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) features and (B, T) mask -> (B, 11, classes) logits."""
        k, v = self.key(hidden), self.value(hidden)
        scores = torch.einsum("nc,btc->bnt", self.queries, k) * k.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        return self.classify(torch.einsum("bnt,btc->bnc", scores.softmax(-1), v))

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy of every query, and the share of captions whose 11 answers are all right."""
        logits = self(hidden, mask)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        exact = float((logits.argmax(-1) == labels).all(-1).float().mean())
        return ce, exact


def frozen_probe(t5, tokenizer, steps: int = 2000, batch: int = 64, train_captions: int = 4000,
                 heldout_captions: int = 400, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Diagnosis: how well a fixed T5's features say each position's colour (a fresh probe, the T5 untouched).

    Returns held-out per-query accuracy and exact-caption accuracy, overall and split by shape count: a T5 that
    does not bind colour to position scores high per query (backgrounds, empty positions) and low on exact
    two-shape captions.
    """
    def feats(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = te.tokenize(tokenizer, captions)
        with torch.no_grad():
            hidden = te.features(t5, ids, mask)
        return hidden, mask, caption_labels(captions)

    train = feats([shapes.caption(s) for s in shapes.scenes(train_captions, seed, "train")])
    held_scenes = shapes.scenes(heldout_captions, seed, "heldout")
    held = feats([shapes.caption(s) for s in held_scenes])
    probe = BindingProbe(train[0].shape[-1], seed * 1000 + 211)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)  # 1e-3 can sit for 1000 steps before attention focuses
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, train_captions, (batch,), generator=g)
        loss, _ = probe.loss(train[0][idx], train[1][idx], train[2][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        right = probe(held[0], held[1]).argmax(-1) == held[2]
    exact = right.all(-1).float()
    count = torch.tensor([len(s.shapes) for s in held_scenes])
    out = {"per_query": float(right.float().mean()), "exact": float(exact.mean())}
    for n in (1, 2):
        if (count == n).any():
            out[f"exact_{n}_shapes"] = float(exact[count == n].mean())
    return out
