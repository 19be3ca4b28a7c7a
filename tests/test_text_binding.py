"""The T5 binding objective: captions parse back to their scenes, labels say each position's colour, and the
probe's loss trains the T5 and only the T5's real tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scalekv_core.model.config import InfinityConfig
from scalekv_core.schedules import get_schedule
from scalekv_core.training import shapes
from scalekv_core.training import text_encoder_training as te
from scalekv_core.training.dataset import TokenSet
from scalekv_core.training.text_binding import BindingProbe, frozen_probe, layout_labels, parse_caption
from scalekv_core.training.transformer_training import Phase, TransformerTrainConfig, train_transformer

SCHEDULE = get_schedule(1.0, "0.06M")
TINY = InfinityConfig(depth=2, embed_dim=32, num_heads=2, block_chunks=2, ffn_hidden=64, text_channels=24,
                      text_maxlen=64, pool_heads=2, d_vae=8)


def test_parse_caption_inverts_caption():
    for scene in shapes.scenes(300, 0) + shapes.scenes(100, 0, "heldout"):
        assert parse_caption(shapes.caption(scene)) == scene


@pytest.mark.parametrize("text", ["a red circle", "a small red circle at the top left",
                                  "a small red circle at the middle on a blue background",
                                  "a small red circle at the top on a blue sky"])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_layout_labels_name_each_positions_colour():
    scene = shapes.Scene(shapes=(shapes.Shape("circle", "red", "top left", "large"),
                                 shapes.Shape("star", "blue", "bottom right", "small")),
                         background=("yellow", "black"))
    none = len(shapes.COLORS)
    red, blue, yellow, black = (shapes.COLORS.index(c) for c in ("red", "blue", "yellow", "black"))
    assert layout_labels(scene).tolist() == [red, none, none, none, none, none, none, none, blue, yellow, black]
    plain = shapes.Scene(shapes=(shapes.Shape("square", "red", "center", "small"),), background=("white",))
    white = shapes.COLORS.index("white")
    assert layout_labels(plain).tolist() == [none] * 4 + [red] + [none] * 4 + [white, white]


def test_probe_reads_only_real_tokens():
    probe = BindingProbe(16, seed=0)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0
    padded = probe(hidden, mask)[0]
    alone = probe(hidden[:1, :5], mask[:1, :5])[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    hidden[0, 5:] = 100.0  # whatever sits under the padding
    torch.testing.assert_close(probe(hidden, mask)[0], alone, rtol=1e-5, atol=1e-6)


def _token_set(n: int = 16) -> TokenSet:
    captions = [shapes.caption(s) for s in shapes.scenes(n, 3)]
    g = torch.Generator().manual_seed(5)
    bits = [torch.randint(0, 2, (n, h * w, TINY.d_vae), generator=g, dtype=torch.uint8) for h, w in SCHEDULE.grids]
    return TokenSet(captions=captions, bits=bits)


def _train(weight: float, steps: int = 10):
    tc = TransformerTrainConfig(phases=[Phase(steps, 8, 2)], warmup=1, seed=0, lr=3e-3, log_every=1000,
                                binding_weight=weight)
    return train_transformer(_token_set(), SCHEDULE, tc, TINY, t5_kwargs={"layers": 1, "heads": 2, "d_ff": 32},
                             log=lambda s: None)


def test_binding_objective_trains_the_t5_and_is_reproducible():
    _, t5_plain, plain = _train(0.0)
    _, t5_bound, bound = _train(1.0)
    assert "binding" not in plain[0] and "binding" in bound[0]
    first, last = np.mean([h["binding"] for h in bound[:3]]), np.mean([h["binding"] for h in bound[-3:]])
    assert last < first - 0.1, (first, last)
    # the probe's gradient reaches the T5: the same run without it ends with other T5 weights
    sp, sb = t5_plain.state_dict(), t5_bound.state_dict()
    assert any(not torch.equal(sp[k], sb[k]) for k in sp)
    _, t5_again, again = _train(1.0)
    assert [h["loss"] for h in again] == [h["loss"] for h in bound]
    assert all(torch.equal(v, t5_again.state_dict()[k]) for k, v in sb.items())


def test_features_are_what_encode_packs():
    t5 = te.build_t5(0, d_model=24, layers=1, heads=2, d_ff=32)
    ids, mask = te.tokenize(te.load_tokenizer(), ["a small red circle at the top on a blue background", "a star"])
    hidden = te.features(t5, ids, mask)
    packed = te.encode(t5, ids, mask)
    n0 = int(mask[0].sum())
    torch.testing.assert_close(packed.kv_compact[:n0], hidden[0, :n0])


class _OracleT5(torch.nn.Module):
    """Stands in for a T5 that binds outright: token n says "query n" and that query's colour (one-hot each)."""

    def __init__(self, tokenizer, informative: bool) -> None:
        super().__init__()
        self.tokenizer, self.informative = tokenizer, informative

    def forward(self, input_ids, attention_mask):
        queries, classes = 11, len(shapes.COLORS) + 1
        out = torch.zeros(*input_ids.shape, queries + classes)
        out[:, :queries, :queries] = torch.eye(queries)
        for row, ids in enumerate(input_ids):
            labels = layout_labels(parse_caption(self.tokenizer.decode(ids, skip_special_tokens=True)))
            if self.informative:
                out[row, torch.arange(queries), queries + labels] = 1.0
        return {"last_hidden_state": out}


def test_frozen_probe_tells_a_binding_t5_from_a_blind_one():
    tok = te.load_tokenizer()
    kw = dict(steps=1000, batch=32, train_captions=300, heldout_captions=100)
    knows = frozen_probe(_OracleT5(tok, True), tok, **kw)
    blind = frozen_probe(_OracleT5(tok, False), tok, **kw)
    assert set(knows) == {"per_query", "exact", "exact_1_shapes", "exact_2_shapes"}
    assert knows["exact_2_shapes"] > 0.9 and knows["per_query"] > 0.98, knows
    assert blind["exact_2_shapes"] < 0.1 and blind["per_query"] < 0.9, blind


def test_report_splits_shape_checks_by_shape_count():
    from scalekv_core.training.prompt_following import Check, Report
    bg = Check("background", "background", "red", "red")
    report = Report(captions=["one", "two"],
                    checks=[[Check("shape", "a", "blue", "blue"), bg],
                            [Check("shape", "a", "blue", "red"), Check("shape", "b", "green", "green"), bg]])
    assert report.shapes_by_count() == {"1 shape": 1.0, "2 shapes": 0.5}
    assert report.as_dict()["shapes_by_count"] == {"1 shape": 1.0, "2 shapes": 0.5}
