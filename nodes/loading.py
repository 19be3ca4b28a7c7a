"""Infinity Model Loader and Infinity Text Encode."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..scalekv_core.limits import brief, shown
from ..scalekv_core.loader import transformer_config_of
from ..scalekv_core.model.quant import T5_WEIGHT_FORMATS, WEIGHT_FORMATS
from ..scalekv_core.pipeline import check_text_width
from . import models, paths, widgets
from .io_types import CATEGORY, InfinityConditioningType, InfinityModelType, InfinityT5Type, schema

log = logging.getLogger(__name__)


class InfinityModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        # The embedded default model (default_model/) is preselected when installed: a fresh install runs as is.
        transformers, vaes, encoders = paths.transformer_choices(), paths.vae_choices(), paths.text_encoder_choices()
        return schema(
            node_id="InfinityModelLoader",
            display_name="Infinity Model Loader",
            category=CATEGORY,
            description="Loads Infinity: the transformer (models/infinity or models/diffusion_models: the 2B file "
                        "or the 8B's shard folder), its VAE and the flan-t5-xl text encoder. The model size is read "
                        "from the files. For smaller GPUs pick weight_format fp8_e4m3fn (8B on 12 GB cards; int8 on "
                        "a Mac, whose MPS has no fp8) or int4 (8 GB cards). ComfyUI moves the models on and off the "
                        "GPU as other nodes need it.",
            inputs=[
                io.Combo.Input("transformer", options=transformers,
                               default=paths.default_choice(transformers, paths.DEFAULT_TRANSFORMER),
                               tooltip="models/infinity: a checkpoint file or the 8B's shard folder (*.index.json)"),
                io.Combo.Input("vae", options=vaes, default=paths.default_choice(vaes, paths.DEFAULT_VAE),
                               tooltip="models/infinity or models/vae: the BSQ-VAE that fits the transformer "
                                       "(2B: infinity_vae_d32reg, 8B: infinity_vae_d56_f8_14_patchify)"),
                io.Combo.Input("text_encoder", options=encoders,
                               default=paths.default_choice(encoders, paths.DEFAULT_TEXT_ENCODER),
                               tooltip="models/text_encoders: the flan-t5-xl folder (config.json, weights, "
                                       "tokenizer), or a single-file T5 encoder (.safetensors, 't5' in the name)"),
                io.Combo.Input("precision", options=models.PRECISION_CHOICES, default="auto",
                               tooltip="transformer blocks: auto = bf16 on CUDA cards that compute it natively "
                                       "(RTX 30xx, A100 and later), fp16 on older ones (RTX 20xx, GTX 10xx), bf16 "
                                       "on a Mac's MPS with macOS 14 or later (fp32 before), fp32 on the CPU"),
                # last, so saved workflows keep their widget order
                io.Combo.Input("weight_format", options=list(WEIGHT_FORMATS), default="none", optional=True,
                               tooltip="how the transformer blocks' linear weights are stored (they are 98% of the "
                                       "model). none: as the checkpoint, 2 bytes per weight in bf16 (8B: 15.9 GiB). "
                                       "fp8_e4m3fn / int8: 1 byte (8B: 8.2 GiB, for 12 GB cards), a small loss of "
                                       "fidelity, int8 the closer (on a Mac int8 only: MPS has no fp8). int4: "
                                       "0.53 bytes (8B: 4.6 GiB, for 8 GB cards), "
                                       "a visible loss. Quantized as the model loads; each layer is expanded to the "
                                       "block precision when it runs (a little slower). A file pre-quantized with "
                                       "`convert --weights` loads as it is with none."),
                io.Combo.Input("t5_weights", options=list(T5_WEIGHT_FORMATS), default="none", optional=True,
                               tooltip="how the T5 text encoder's linear weights are stored. none: fp16 on a CUDA "
                                       "GPU (flan-t5-xl: 2.75 GiB), fp32 elsewhere. fp8_e4m3fn / int8: 1 byte per "
                                       "weight (1.2 GiB), images nearly the same, int8 the closer (on a Mac int8 "
                                       "only: MPS has no fp8). T5 only runs while a prompt is "
                                       "encoded; ComfyUI moves it off the GPU when the sampler needs the room."),
            ],
            outputs=[
                InfinityModelType.Output(display_name="model"),
                InfinityT5Type.Output(display_name="t5"),
            ],
        )

    @classmethod
    def validate_inputs(cls, transformer=None, vae=None, text_encoder=None, precision=None,
                        weight_format=None, t5_weights=None) -> bool | str:
        """Menu values as the menus hold them now (ComfyUI 0.3.x lets any string through a V3 combo), so a missing
        or mistyped file is refused before anything loads, naming the folders searched."""
        problem = widgets.problem(widgets.choice("precision", precision, models.PRECISION_CHOICES),
                                  widgets.choice("weight_format", weight_format, WEIGHT_FORMATS),
                                  widgets.choice("t5_weights", t5_weights, T5_WEIGHT_FORMATS))
        if problem is None:  # fp8 on Apple's MPS: refused when queued, naming int8, not when the sampler runs
            problem = models.device_problem(precision, weight_format, t5_weights)
        for field, value, choices, resolve in (
                ("transformer", transformer, paths.transformer_choices, paths.resolve_transformer),
                ("vae", vae, paths.vae_choices, paths.resolve_vae),
                ("text_encoder", text_encoder, paths.text_encoder_choices, paths.resolve_text_encoder)):
            if problem is not None or value is None:
                continue
            problem = widgets.problem(widgets.text(field, value, "name"))
            if problem is None and value not in choices():
                try:
                    resolve(value)
                    problem = f"{field}: {shown(value)} is not a name in the menu (mind spaces and case)"
                except (FileNotFoundError, ValueError) as e:
                    problem = f"{field}: {brief(str(e))}"
        return True if problem is None else problem

    @classmethod
    def fingerprint_inputs(cls, transformer=None, vae=None, text_encoder=None, **_) -> str:
        """A model file replaced under the same name (a new `convert`, a finished download) is loaded again, not
        served from ComfyUI's cache: the files' versions are the fingerprint."""
        return "|".join(paths.fingerprint(resolve, name) for resolve, name in (
            (paths.resolve_transformer, transformer), (paths.resolve_vae, vae),
            (paths.resolve_text_encoder, text_encoder)))

    @classmethod
    def execute(cls, transformer: str, vae: str, text_encoder: str, precision: str = "auto",
                weight_format: str = "none", t5_weights: str = "none") -> io.NodeOutput:
        # T5 first, then the transformer's width from its header: a T5 folder without its tokenizer, or one that
        # does not fit the transformer, is refused in seconds, before the transformer (16 GB for the 8B) loads
        t5 = models.load_t5(paths.resolve_text_encoder(text_encoder), precision, t5_weights)
        transformer_path = paths.resolve_transformer(transformer)
        try:
            width = transformer_config_of(transformer_path).text_channels
        except (OSError, ValueError):  # unreadable here: the loader below names the problem
            width = None
        if width is not None:
            check_text_width(width, t5.encoder.text_channels, transformer, t5.info["text_encoder"])
        model = models.load_infinity(transformer_path, paths.resolve_vae(vae), precision,
                                     weight_format)
        models.check_text_channels(model, t5)
        return io.NodeOutput(model, t5)


class InfinityTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="InfinityTextEncode",
            display_name="Infinity Text Encode",
            category=CATEGORY,
            description="Encodes a prompt with T5 for the Infinity Sampler. A separate node, so T5 can leave the "
                        "GPU before sampling. For a negative prompt use a second one; leave the sampler's negative "
                        "unconnected, or its prompt empty, to use the model's learned unconditional embedding.",
            inputs=[
                InfinityT5Type.Input("t5", tooltip="the text encoder from Infinity Model Loader"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="what to draw, in plain words; T5 reads the first 512 tokens (the console "
                                        "says when a longer prompt loses its end). Empty as a negative means no "
                                        "negative prompt (the model's own unconditional embedding)"),
            ],
            outputs=[InfinityConditioningType.Output(display_name="conditioning")],
        )

    @classmethod
    def validate_inputs(cls, prompt=None) -> bool | str:
        """Text T5 can read: a string of bounded length, valid UTF-8 (no lone surrogates), no NUL."""
        problem = widgets.problem(widgets.text("prompt", prompt))
        return True if problem is None else problem

    @classmethod
    def execute(cls, t5: models.InfinityT5, prompt: str) -> io.NodeOutput:
        problem = cls.validate_inputs(prompt)  # a linked prompt arrives unchecked
        if problem is not True:
            raise ValueError(problem)
        for note in t5.encoder.truncation_notes([prompt]):
            log.warning("Infinity Text Encode: %s", note)
        cond = t5.encode([prompt])
        if not prompt.strip():  # as a negative: none (the sampler uses the learned unconditional embedding)
            cond = models.BlankPrompt(cond.kv_compact, cond.lens, cond.cu_seqlens, cond.max_len)
        return io.NodeOutput(cond)
