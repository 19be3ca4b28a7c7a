"""Train the default model from nothing: data set, VAE, then transformer + T5, written in the users' file layout.

    python -m scalekv_core.training train --out default_model            # the committed weights
    python -m scalekv_core.training train --out /tmp/smoke --preset smoke # seconds, for tests

Same seed, torch version, thread count and CPU kernel set give the same weights: every random draw comes from a
seeded generator and the thread count is fixed (`--threads`, 1 by default); CPU float reductions depend on the
thread count and on the vector instructions torch dispatches to (AVX2, AVX512, ...), which the training log
records as `cpu_capability`. On another CPU the first steps agree to the last bit or two, then the runs drift
apart into a differently trained model (docs/training.md). One thread is also the fast choice on a shared
2-core machine: with two, every small op waits for a preempted OpenMP thread, and a training step took 10-20x
longer.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..model.config import InfinityConfig
from ..model.vae import VAEConfig
from ..loader import META_RESOLUTION
from ..schedules import Schedule, get_schedule, resolution_label
from . import shapes
from . import text_encoder_training as te
from .dataset import tokenize_scenes
from .transformer_training import DEFAULT_TRANSFORMER, Phase, TransformerTrainConfig, train_transformer
from .vae_training import DEFAULT_VAE, VAETrainConfig, train_vae

TRANSFORMER_FILE = Path("infinity") / "infinity_shapes.safetensors"
VAE_FILE = Path("vae") / "infinity_shapes_vae.safetensors"
T5_FOLDER = Path("text_encoders") / "t5_shapes"
LOG_FILE = Path("infinity") / "infinity_shapes_training.json"
_TOKENS_FORMAT = 3  # cached token sets: 2 added shape_tokens, 3 latents


@dataclass
class Recipe:
    """Everything that decides the weights."""

    seed: int = 0
    train_scenes: int = 2000
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    transformer: TransformerTrainConfig = field(default_factory=TransformerTrainConfig)
    #: a second stage from the first one's weights (fresh optimizer and schedule), or None
    refine: TransformerTrainConfig | None = None
    vae_config: VAEConfig = DEFAULT_VAE
    transformer_config: InfinityConfig = DEFAULT_TRANSFORMER
    t5: dict = field(default_factory=lambda: {"layers": 2, "heads": 4, "d_ff": 256})


def preset(name: str, seed: int = 0) -> Recipe:
    """'default': the committed model (49 min alone on one core, 120 shared; docs/training.md has the times). 'smoke': a few steps of everything."""
    if name == "default":
        r = Recipe(seed=seed, train_scenes=8000,
                   transformer=TransformerTrainConfig(shape_weight=4.0, binding_weight=3.0),
                   refine=TransformerTrainConfig(phases=[Phase(1500, 32, 4), Phase(600, 8, 7)], lr=1e-3,
                                                 shape_weight=4.0, self_correct=0.8, binding_weight=3.0,
                                                 log_every=50))
    elif name == "smoke":
        r = Recipe(seed=seed, train_scenes=16, vae=VAETrainConfig(init="random", steps=3, batch=2, crop=4, log_every=1),
                   transformer=TransformerTrainConfig(phases=[Phase(3, 4, 3), Phase(2, 2, 7)], warmup=2,
                                                      log_every=1),
                   vae_config=VAEConfig(codebook_dim=8, patch_size=16, base_ch=24, num_res_blocks=0,
                                        ch_mult=(1, 1, 1, 1, 1)),
                   transformer_config=InfinityConfig(depth=2, embed_dim=32, num_heads=2, block_chunks=2,
                                                     ffn_hidden=64, text_channels=32, text_maxlen=512,
                                                     pool_heads=2, d_vae=8),
                   t5={"layers": 1, "heads": 2, "d_ff": 32})
    else:
        raise ValueError(f"unknown preset {name!r}; choose default or smoke")
    r.vae.seed = r.transformer.seed = seed
    if r.refine is not None:
        r.refine.seed = seed + 1  # its own batch and caption-dropout stream
    return r


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: the VAE's 'quantize' aliases 'quantizer', and safetensors refuses shared storage
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata)


def _as_json(obj: object) -> object:
    """A dataclass or value as plain JSON values, the form the training log stores and compares."""
    return json.loads(json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj, default=str))


def _key(*parts: object) -> str:
    """Stable hash of everything that decides a stage's result (recipe parts, torch version, threads)."""
    text = json.dumps([_as_json(p) for p in parts], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _vae_and_tokens(recipe: Recipe, schedule: Schedule, threads: int, cache: Path | None,
                    log: Callable[[str], None]):
    """Stage 1 and 2 (VAE, tokenized data set), reused from `cache` when the same recipe already made them."""
    from .dataset import TokenSet
    from .vae_training import init_vae
    key = _key(recipe.vae, recipe.vae_config, recipe.train_scenes, recipe.seed, torch.__version__, threads,
               _TOKENS_FORMAT)
    path = None if cache is None else cache / f"vae_tokens_{key}.pt"
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)  # tensors, lists and numbers only: no pickled code runs
        vae = init_vae(recipe.vae_config, 0)
        vae.load_state_dict(saved["vae"])
        log(f"reusing VAE and tokens from {path} (recipe key {key})")
        return vae.eval().requires_grad_(False), saved["vae_history"], TokenSet(**saved["tokens"]), saved["times"]
    times: dict[str, float] = {}
    t0 = time.time()
    vae, vae_hist = train_vae(schedule, recipe.vae, recipe.vae_config, log=log)
    times["vae_s"] = time.time() - t0
    t1 = time.time()
    data = tokenize_scenes(vae, shapes.scenes(recipe.train_scenes, recipe.seed, "train"), schedule)
    times["dataset_s"] = time.time() - t1
    log(f"tokenized {len(data)} training scenes in {times['dataset_s']:.0f}s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vae": vae.state_dict(), "vae_history": vae_hist, "times": times,
                    "tokens": {"captions": data.captions, "bits": data.bits, "shape_tokens": data.shape_tokens,
                               "latents": data.latents}},
                   path)
    return vae, vae_hist, data, times


def _load_stage1(folder: Path, recipe: Recipe, log: Callable[[str], None]):
    """The first stage's transformer and T5 from a folder that the same recipe's first stage wrote."""
    from transformers import T5EncoderModel
    from safetensors.torch import load_file
    from .transformer_training import init_transformer
    log_path = folder / LOG_FILE
    if not log_path.is_file():
        raise FileNotFoundError(f"{log_path}: no training log, so the weights in {folder} cannot be checked")
    record = json.loads(log_path.read_text())
    made_by = record["recipe"]
    wanted = _as_json(recipe)
    # a log written before a field existed holds that field's default
    defaults = _as_json(TransformerTrainConfig())
    made_by["transformer"] = {**{k: v for k, v in defaults.items() if k != "seed"}, **made_by.get("transformer", {})}
    for key in ("seed", "train_scenes", "vae", "vae_config", "transformer", "transformer_config", "t5"):
        if made_by.get(key) != wanted[key]:
            raise ValueError(f"{log_path}: its recipe's '{key}' differs from this recipe's, so {folder} is not this "
                             f"recipe's first stage ({made_by.get(key)} != {wanted[key]})")
    model = init_transformer(recipe.transformer_config, recipe.transformer.seed)
    model.load_state_dict(load_file(str(folder / TRANSFORMER_FILE)), strict=True)
    t5 = T5EncoderModel.from_pretrained(folder / T5_FOLDER, local_files_only=True).float()
    log(f"first stage from {folder} (trained in {record['seconds']['transformer_s']:.0f}s)")
    return model, t5, record


def train_default(out: str | Path, recipe: Recipe, threads: int = 1, log: Callable[[str], None] = print,
                  cache: str | Path | None = None, stage1_from: str | Path | None = None) -> dict:
    """Run the whole recipe and write the three model files plus a JSON log; returns the log.

    With `cache`, the VAE and the tokenized data set are stored there and reused by a later run of the same
    recipe (same key), so transformer settings can be tried without retraining the VAE; the logged times are
    the stages' own, wherever they ran. With `stage1_from`, the first transformer stage is read from a folder
    this recipe's first stage wrote (its log is checked), and only `recipe.refine` runs: same seed, torch and
    threads give the same weights as the whole run.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(out)
    schedule: Schedule = get_schedule(1.0, "0.06M")
    vae, vae_hist, data, times = _vae_and_tokens(recipe, schedule, threads, None if cache is None else Path(cache),
                                                 log)
    times = dict(times)
    if stage1_from is not None:
        model, t5, stage1 = _load_stage1(Path(stage1_from), recipe, log)
        tr_hist = stage1["transformer_history"]
        times["transformer_s"] = stage1["seconds"]["transformer_s"]
    else:
        t2 = time.time()
        model, t5, tr_hist = train_transformer(data, schedule, recipe.transformer, recipe.transformer_config,
                                               t5_kwargs=recipe.t5, log=log)
        times["transformer_s"] = time.time() - t2
    refine_hist: list[dict] = []
    if recipe.refine is not None:
        t3 = time.time()
        model, t5, refine_hist = train_transformer(data, schedule, recipe.refine, recipe.transformer_config,
                                                   log=log, init=(model, t5))
        times["refine_s"] = time.time() - t3
    times["total_s"] = sum(v for k, v in times.items() if k != "total_s")

    record = {
        "recipe": _as_json(recipe),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vae_final": vae_hist[-1] if vae_hist else None, "transformer_final": tr_hist[-1],
        "vae_history": vae_hist[:: max(1, len(vae_hist) // 50)],
        "transformer_history": tr_hist if stage1_from is not None else tr_hist[:: max(1, len(tr_hist) // 100)],
    }
    if refine_hist:
        record["refine_final"] = refine_hist[-1]
        record["refine_history"] = refine_hist[:: max(1, len(refine_hist) // 100)]
    if stage1_from is not None:
        record["stage1_from"] = str(stage1_from)
    meta = {"format": "pt", "trained_by": "scalekv_core.training", "seed": str(recipe.seed),
            "total_seconds": f"{times['total_s']:.0f}"}
    _save(model.state_dict(), out / TRANSFORMER_FILE, {**meta, META_RESOLUTION: resolution_label(schedule)})
    _save(vae.state_dict(), out / VAE_FILE, meta)
    te.save_t5(t5, out / T5_FOLDER)
    (out / LOG_FILE).write_text(json.dumps(record, indent=1))
    log(f"wrote {out / TRANSFORMER_FILE}, {out / VAE_FILE}, {out / T5_FOLDER} in {times['total_s']:.0f}s total")
    return record
