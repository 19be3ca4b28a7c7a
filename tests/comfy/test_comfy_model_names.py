"""What a model is called in user-facing text: the sampler's note, its memory report and the budget widget's header.

Every transformer that is none of the released shapes, the embedded default model included, was called "custom":
"512x512 is outside what custom was trained at". Now a released shape keeps its name (infinity-2b), the embedded
model is infinity-shapes, and any other shape is "this model".
"""
from __future__ import annotations

import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "default_model"


@pytest.fixture(scope="module")
def models(pack):
    return pack.nodes.models


def test_names_of_released_embedded_and_other_shapes(models, loaded):
    from scalekv_core.model.config import KNOWN_MODELS

    tiny = loaded[0].pipeline.transformer.cfg
    assert models.architecture_name(KNOWN_MODELS["2b"]) == "infinity-2b"
    assert models.architecture_name(KNOWN_MODELS["2b"], "/m/infinity_shapes.safetensors") == "infinity-2b"
    assert models.architecture_name(tiny) == "this model"
    assert models.architecture_name(tiny, "/models/infinity/infinity_tiny.safetensors") == "this model"
    assert models.architecture_name(tiny, EMBEDDED / "infinity" / "infinity_shapes.safetensors") == "infinity-shapes"
    assert models.architecture_name(tiny, "infinity_shapes.safetensors") == "infinity-shapes"  # a menu name
    assert loaded[0].info["architecture"] != "custom"


@pytest.fixture(scope="module")
def embedded(models):
    """The embedded default model as the loader loads it (transformer, VAE, its T5), and one prompt's features."""
    with torch.inference_mode():
        model = models.load_infinity(str(EMBEDDED / "infinity" / "infinity_shapes.safetensors"),
                                     str(EMBEDDED / "vae" / "infinity_shapes_vae.safetensors"))
        t5 = models.load_t5(str(EMBEDDED / "text_encoders" / "t5_shapes"))
        return model, t5.encode(["a large red circle at the top left on a blue background"])


def test_the_sampler_names_the_embedded_model_in_its_note(run, embedded, sampler_inputs):
    model, positive = embedded
    assert model.info["architecture"] == "infinity-shapes"
    out = run("InfinitySampler", model=model, positive=positive, **sampler_inputs(resolution="512x512 (1:1)"))
    report = out.ui["scalekv_memory"][0]
    assert report["note"].startswith("512x512 is outside what infinity-shapes was trained at (256x256 (1:1))"), \
        report["note"]
    assert report["model"]["architecture"] == "infinity-shapes"


def test_the_widget_names_the_model_it_plans_for(post):
    """The plan route's header name for the loader's transformer: the embedded model's, or 'this model'."""
    import shutil

    import folder_paths

    def plan(transformer: str) -> dict:
        status, answer = post({"transformer": transformer, "resolution": "256x256 (1:1)"})
        assert status == 200, answer
        return answer

    assert plan("infinity_tiny.safetensors")["model"]["name"] == "this model"
    # the session registers no embedded model (conftest): its file, copied where the loader finds it
    target = pathlib.Path(folder_paths.get_folder_paths("infinity")[0]) / "infinity_shapes.safetensors"
    shutil.copyfile(EMBEDDED / "infinity" / "infinity_shapes.safetensors", target)
    try:
        assert plan("infinity_shapes.safetensors")["model"]["name"] == "infinity-shapes"
    finally:
        target.unlink()
        folder_paths.filename_list_cache.pop("infinity", None)
