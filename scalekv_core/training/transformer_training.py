"""Training the Infinity transformer (scalekv_core.model.transformer.Infinity) and its T5 jointly.

Objective: Infinity's teacher-forced bit cross-entropy. Every scale's input is built from the ground-truth bits
of the earlier scales exactly as the sampler builds it from sampled bits (`quantizer.teacher_inputs`), and all
scales run in one block-causal pass (`teacher_forcing`). A fraction of captions is replaced by the learned
`cfg_uncond` rows, the unconditional input classifier-free guidance uses at inference. Training runs in phases:
first only the coarse scales (cheap, and where the prompt decides layout and colour), then all of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..model.config import InfinityConfig
from ..model.text_encoder import TextConditioning
from ..model.transformer import Infinity
from ..schedules import Schedule
from . import text_encoder_training as te
from .dataset import TokenSet
from .quantizer import requantize
from .teacher_forcing import bit_loss, teacher_forced_logits
from .text_binding import BindingProbe, caption_labels

#: The default model: 4 blocks (2 chunks) of width 128, 4 heads of 32, T5 width 128, 16 bits per token.
DEFAULT_TRANSFORMER = InfinityConfig(depth=4, embed_dim=128, num_heads=4, block_chunks=2, ffn_hidden=512,
                                     text_channels=128, text_maxlen=512, pool_heads=4, d_vae=16)


@dataclass
class Phase:
    """`steps` optimizer steps of `batch` images, each over the first `num_scales` scales."""

    steps: int
    batch: int
    num_scales: int


@dataclass
class TransformerTrainConfig:
    phases: list[Phase] = field(default_factory=lambda: [Phase(2000, 32, 4), Phase(150, 16, 5), Phase(100, 8, 7)])
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: int = 30
    cfg_dropout: float = 0.1  # fraction of captions replaced by the unconditional embedding
    shape_weight: float = 0.0  # extra loss weight of tokens that touch a shape (see teacher_forcing.bit_loss)
    #: fraction of images whose earlier scales are the model's own bits, with targets that correct them
    self_correct: float = 0.0
    #: weight of the T5 binding objective (text_binding.BindingProbe: each position's colour), 0 for none
    binding_weight: float = 0.0
    seed: int = 0
    log_every: int = 25

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


def init_transformer(cfg: InfinityConfig, seed: int) -> Infinity:
    """Small-normal weights, zero biases, AdaLN modulation starting near identity with gates at 0.2."""
    torch.manual_seed(seed)
    model = Infinity(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "cfg_uncond":
                p.normal_(0.0, 1.0)  # lives in T5-output space, which is RMS-normalised to ~1
            elif name.endswith("scale_mul_1H11"):
                continue  # keeps log(4), the original's init
            elif name.endswith("ca_norm.weight") or name.endswith("text_norm.weight"):
                p.fill_(1.0)
            elif name.endswith("ada_gss"):
                p.zero_()
                p[:, :, 0:2] = 0.2  # gamma1, gamma2
            elif name.startswith("head_nm.") or name.startswith("shared_ada_lin."):
                p.zero_() if name.endswith("bias") else p.normal_(0.0, 0.002)
            elif p.ndim >= 2 or name in ("pos_start",):
                torch.nn.init.trunc_normal_(p, std=0.02)
            else:
                p.zero_()
    return model


def _with_uncond(model: Infinity, cond: TextConditioning, drop: np.ndarray) -> TextConditioning:
    """Replace the dropped captions' rows by cfg_uncond[:len], as the sampler builds its unconditional half."""
    if not drop.any():
        return cond
    parts, start = [], 0
    for i, n in enumerate(cond.lens):
        parts.append(model.cfg_uncond[:n] if drop[i] else cond.kv_compact[start:start + n])
        start += n
    return TextConditioning._from_parts(torch.cat(parts), list(cond.lens), cond.kv_compact.device)


@torch.no_grad()
def _own_history(model: Infinity, cond: TextConditioning, bits: list[torch.Tensor], latents: torch.Tensor,
                 own: torch.Tensor, schedule: Schedule, num_scales: int, draw: torch.Generator
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and targets for self-correction: rows in `own` get the model's sampled bits as their earlier scales.

    Like Infinity's bitwise self-correction, but the flips are the model's own mistakes (drawn from its
    teacher-forced predictions), which sit on the nearly tied bits, not uniform noise. The targets are
    re-quantized from the latent after those bits, so the later scales learn to undo them.
    """
    n = num_scales
    if n < 2:  # no earlier scale to replace
        return bits[:n], bits[:n]
    # the last scale's bits are never history, so its logits are not computed
    logits = teacher_forced_logits(model, cond.kv_compact.detach(), cond.lens, bits, schedule, n - 1)
    B, L, V = logits.shape
    p_one = logits.reshape(B, L, V // 2, 2).float().softmax(-1)[..., 1]
    drawn = (torch.rand(p_one.shape, generator=draw) < p_one).to(torch.uint8)
    sizes = list(schedule.tokens_per_scale[:n - 1])
    mine = [torch.where(own[:, None, None], d, b) for d, b in zip(drawn.split(sizes, dim=1), bits[:n - 1])]
    fixed = requantize(latents, schedule, mine)
    targets = [torch.where(own[:, None, None], t, b) for t, b in zip(fixed, bits[:n])]
    return mine + [bits[n - 1]], targets


def train_transformer(data: TokenSet, schedule: Schedule, tc: TransformerTrainConfig,
                      cfg: InfinityConfig = DEFAULT_TRANSFORMER, t5_kwargs: dict | None = None,
                      log: Callable[[str], None] = print,
                      init: tuple[Infinity, torch.nn.Module] | None = None
                      ) -> tuple[Infinity, torch.nn.Module, list[dict]]:
    """Joint training of transformer and T5 on the token set; returns both (eval mode) and the loss history.

    `init` continues from a trained (transformer, T5) pair, with a fresh optimizer and learning-rate schedule.
    """
    if init is None:
        model = init_transformer(cfg, tc.seed)
        t5 = te.build_t5(tc.seed + 1, d_model=cfg.text_channels, **(t5_kwargs or {}))
    else:
        model, t5 = init
    model = model.train().requires_grad_(True)
    t5 = t5.train().requires_grad_(True)
    tokenizer = te.load_tokenizer()
    probe = BindingProbe(cfg.text_channels, tc.seed * 1000 + 203) if tc.binding_weight else None
    params = list(model.parameters()) + list(t5.parameters()) + ([] if probe is None else list(probe.parameters()))
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.97))
    total = tc.total_steps

    def lr_at(s: int) -> float:
        return min(1.0, (s + 1) / tc.warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng([tc.seed, 201])
    draw = torch.Generator().manual_seed(tc.seed * 1000 + 202)  # the model's own bits for self-correction
    history: list[dict] = []
    t0, step = time.time(), 0
    for phase in tc.phases:
        for _ in range(phase.steps):
            index = rng.choice(len(data), size=phase.batch, replace=False)
            drop = rng.random(phase.batch) < tc.cfg_dropout
            captions, bits = data.batch(index)
            ids, mask = te.tokenize(tokenizer, captions)
            hidden = te.features(t5, ids, mask)
            cond = _with_uncond(model, TextConditioning.from_padded(hidden, mask), drop)
            inputs = targets = bits
            if tc.self_correct:
                own = torch.from_numpy(rng.random(phase.batch) < tc.self_correct)
                if bool(own.any()):
                    inputs, targets = _own_history(model, cond, bits, data.latent_batch(index), own, schedule,
                                                    phase.num_scales, draw)
            logits = teacher_forced_logits(model, cond.kv_compact, cond.lens, inputs, schedule, phase.num_scales)
            focus = data.shape_token_batch(index) if tc.shape_weight else None
            loss, per_scale = bit_loss(logits, targets, schedule, focus, tc.shape_weight)
            record = {}
            if probe is not None:
                bind, exact = probe.loss(hidden, mask, caption_labels(captions))
                record = {"binding": float(bind.detach()), "binding_exact": exact}
                loss = loss + tc.binding_weight * bind
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            opt.step()
            sched.step()
            history.append({"step": step, "scales": phase.num_scales, "loss": float(loss.detach()),
                            "per_scale": per_scale, **record})
            if step % tc.log_every == 0 or step == total - 1:
                log(f"transformer step {step}/{total} ({phase.num_scales} scales, batch {phase.batch}) "
                    f"loss {history[-1]['loss']:.4f} per scale {' '.join(f'{v:.3f}' for v in per_scale)} "
                    + (f"binding {record['binding']:.3f} exact {record['binding_exact']:.2f} " if record else "")
                    + f"({time.time() - t0:.0f}s)")
            step += 1
    return model.eval().requires_grad_(False), t5.eval().requires_grad_(False), history
