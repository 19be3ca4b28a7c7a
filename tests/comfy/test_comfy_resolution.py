"""The resolution menus' "auto": the loaded model's own size (a file's scalekv_resolution metadata, else the released
models' 1024x1024), and a note when a chosen resolution is outside what the model was trained at."""
from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file, save_file

from helpers_tiny import TINY_TRANSFORMER

AUTO = "auto (the model's own size)"


@pytest.fixture(scope="module")
def native_256(run, tmp_path_factory):
    """The tiny transformer saved with the metadata the embedded model's training writes (trained at 256x256)."""
    import folder_paths

    path = folder_paths.get_folder_paths("infinity")[0] + "/infinity_tiny_native256.safetensors"
    save_file(load_file(str(TINY_TRANSFORMER)), path, metadata={"scalekv_resolution": "256x256 (1:1)"})
    model, _ = run("InfinityModelLoader", transformer="infinity_tiny_native256.safetensors",
                   vae="vae_tiny.safetensors", text_encoder="t5_tiny", precision="auto").result
    yield model
    import os
    os.unlink(path)


def test_auto_is_the_models_own_size(pack, native_256, loaded):
    cache = pack.nodes.cache
    assert native_256.info["native_resolution"] == ("256x256 (1:1)", False)
    assert cache.schedule_for(AUTO, native_256.info["native_resolution"]).pixel_size == (256, 256)
    assert loaded[0].info["native_resolution"] == ("1024x1024 (1:1)", True)  # no metadata: a released model
    assert cache.schedule_for(AUTO, loaded[0].info["native_resolution"]).pixel_size == (1024, 1024)


def test_auto_samples_at_the_models_size(run, native_256, encoded, sampler_inputs):
    image = run("InfinitySampler", model=native_256, positive=encoded,
                **sampler_inputs(resolution=AUTO)).result[0]
    assert tuple(image.shape) == (1, 256, 256, 3)


def test_a_resolution_outside_training_is_said(run, native_256, encoded, sampler_inputs, caplog):
    with caplog.at_level(logging.WARNING):
        out = run("InfinitySampler", model=native_256, positive=encoded,
                  **sampler_inputs(resolution="512x512 (1:1)"))
    note = out.ui["scalekv_memory"][0]["note"]
    assert "512x512 is outside what" in note and "256x256 (1:1)" in note
    assert note in caplog.text
    inside = run("InfinitySampler", model=native_256, positive=encoded, **sampler_inputs(resolution=AUTO))
    assert "note" not in inside.ui["scalekv_memory"][0]


def test_calibration_auto_names_the_file_with_the_models_size(run, native_256, loaded, tmp_path):
    import folder_paths

    out = run("ScaleKVCalibrate", model=native_256, t5=loaded[1], prompts="a red fox", resolution=AUTO,
              budget=10.0, num_drafters=0, seed=0, filename_prefix="auto_calib")
    assert out.result[0] == "auto_calib_256x256_10pct.json"
    import os
    for name in ("auto_calib_256x256_10pct.json", "auto_calib_256x256_10pct.asi.json"):
        os.unlink(os.path.join(folder_paths.get_folder_paths("scalekv")[0], name))
