"""Model folders of the pack: registration in ComfyUI's `folder_paths`, menu choices, and name -> path lookups.

Keys:
- `infinity` (models/infinity): transformer files, the 8B's shard folders (any folder holding a `*.index.json`),
  and, accepted too, VAE files.
- `scalekv` (models/scalekv): budget JSON files written by ScaleKV Calibrate (or copied there by hand).
- core `diffusion_models` (models/diffusion_models, models/unet): transformer files and shard folders whose name
  says "infinity", where artists keep the other image models (the rest of that folder is not listed).
- core `vae` (VAE files) and core `text_encoders` (T5 = a sub-folder holding `config.json`, or a single T5
  encoder file where ComfyUI ships the T5 tokenizer it needs).

Registration merges with what is already there (a user's extra_model_paths.yaml is applied before packs
import): our default folder is appended if missing and the extensions are unioned, never replaced.

The embedded default model (`default_model/` in the pack: infinity/, vae/, text_encoders/) is registered last for
its three keys, so a fresh install has a model in every menu while a user's file of the same name still wins.
`SCALEKV_DEFAULT_MODEL_DIR` points at another folder with that layout (tests use it; empty = none).
"""
from __future__ import annotations

import os
from typing import Callable

import folder_paths

from ..scalekv_core.checkpoint import file_version
from ..scalekv_core.kvcache.budget import ASI_SUFFIX
from ..scalekv_core.limits import TEXTS, InputError, shown
from ..scalekv_core.safe_files import is_apple_double, portable_name_problem, relative_name_problem

INFINITY = "infinity"
SCALEKV = "scalekv"
VAE = "vae"
TEXT_ENCODERS = "text_encoders"
DIFFUSION_MODELS = "diffusion_models"
#: The word a file or shard folder in models/diffusion_models must hold in its name to be listed as a transformer.
DIFFUSION_MODELS_WORD = "infinity"

BUDGET_EXTENSIONS = {".json"}
#: The embedded default model: folder in the pack, and the names its files have in the menus.
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_ENV = "SCALEKV_DEFAULT_MODEL_DIR"
DEFAULT_TRANSFORMER = "infinity_shapes.safetensors"
DEFAULT_VAE = "infinity_shapes_vae.safetensors"
DEFAULT_TEXT_ENCODER = "t5_shapes"
#: The embedded VAE and T5 under keys of their own: under ComfyUI's "vae" and "text_encoders" its own loaders
#: (VAELoader, CLIPLoader) listed them beside the user's SD and Flux files.
DEFAULT_VAE_KEY = "scalekv_default_vae"
DEFAULT_TEXT_ENCODERS_KEY = "scalekv_default_text_encoders"
#: Sub-folder of default_model/ registered under each key.
DEFAULT_MODEL_SUBDIRS = {INFINITY: "infinity", DEFAULT_VAE_KEY: "vae", DEFAULT_TEXT_ENCODERS_KEY: "text_encoders"}
#: Where ComfyUI's loaders look, shown in errors ("models/infinity") next to the real folders searched.
FOLDER_LABELS = {INFINITY: "models/infinity", SCALEKV: "models/scalekv", VAE: "models/vae",
                 TEXT_ENCODERS: "models/text_encoders", DIFFUSION_MODELS: "models/diffusion_models",
                 DEFAULT_VAE_KEY: "the embedded model", DEFAULT_TEXT_ENCODERS_KEY: "the embedded model"}


def register_folder(key: str, default_dir: str, extensions: set[str]) -> None:
    """Add `default_dir` to `key` (kept after folders the user configured) and union the extensions."""
    paths, exts = folder_paths.folder_names_and_paths.get(key, ([], set()))
    paths = list(paths)
    if default_dir not in paths:
        paths.append(default_dir)
    folder_paths.folder_names_and_paths[key] = (paths, set(exts) | set(extensions))


def default_model_dir() -> str | None:
    """The embedded model's folder: the pack's default_model/, or SCALEKV_DEFAULT_MODEL_DIR (empty: none)."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    if override is None:
        return os.path.join(PACK_DIR, "default_model")
    return os.path.abspath(override) if override.strip() else None


def register_folders() -> None:
    register_folder(INFINITY, os.path.join(folder_paths.models_dir, INFINITY), set(folder_paths.supported_pt_extensions))
    register_folder(SCALEKV, os.path.join(folder_paths.models_dir, SCALEKV), BUDGET_EXTENSIONS)
    root = default_model_dir()
    if root is not None:  # last: the user's folders and ComfyUI's own are searched first (their extensions kept)
        for key, sub in DEFAULT_MODEL_SUBDIRS.items():
            register_folder(key, os.path.join(root, sub), set(folder_paths.supported_pt_extensions))


# ------------------------------------------------------------------------------------------------ names


def clean_name(name: str) -> str:
    """A menu name as a relative path; absolute paths, drives ('D:x') and '..' cannot leave the model folders, under
    any OS's rules (scalekv_core.safe_files.relative_name_problem, the rule of a shard index's entries too)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("no model name given")
    try:
        TEXTS["name"].check(name)
    except InputError as e:
        raise ValueError(f"{shown(name)} is not a usable name: {str(e).split(': ', 1)[1]}") from None
    rel = os.path.normpath(name.strip().replace("\\", "/"))
    if rel == ".":  # '.', 't5_tiny/..'
        raise ValueError(f"{shown(name)} names a model folder itself, not a file or folder in it")
    # the name as given and as normalized: on Windows normpath('./C:/x') is 'C:\\x', an absolute path
    if relative_name_problem(name.strip()) is not None or relative_name_problem(rel) is not None:
        raise ValueError(f"{shown(name)} is not a name inside a model folder")
    return rel


def new_file_name(name: str, prefix: bool = False) -> str:
    """clean_name for a name this pack creates: also one Windows can create (checked on every OS, so a workflow
    works on the next machine, and refused before the work rather than when the file is written after it).
    `prefix`: the start of a name, more text follows (Calibrate's filename_prefix)."""
    rel = clean_name(name)
    problem = portable_name_problem(name.strip(), prefix=prefix)
    if problem is not None:
        raise ValueError(f"{shown(name)} is not a usable file name: it {problem}")
    return rel


def _inside(base: str, path: str) -> bool:
    """Whether `path` is `base` or below it, compared as the OS compares names (case on Windows); a path on another
    drive is not inside (os.path.commonpath raises ValueError for it)."""
    base, path = (os.path.normcase(os.path.normpath(p)) for p in (base, path))
    try:
        return os.path.commonpath([base, path]) == base
    except ValueError:
        return False


def _dirs(key: str) -> list[str]:
    return folder_paths.get_folder_paths(key) if key in folder_paths.folder_names_and_paths else []


def _searched(*keys: str) -> str:
    dirs = [d for k in keys for d in _dirs(k)]
    return f"{' or '.join(FOLDER_LABELS.get(k, k) for k in keys)} (searched: {', '.join(dirs) or 'no folders'})"


def _is_index(name: str) -> bool:
    """A shard folder's index file; macOS's AppleDouble `._NAME.index.json` beside it is not one."""
    return name.endswith(".index.json") and not is_apple_double(name)


def _is_shard_folder(path: str) -> bool:
    return os.path.isdir(path) and any(_is_index(f) for f in os.listdir(path))


def _walk_folders(key: str, is_match) -> list[str]:
    """Relative names of the folders under `key` that `is_match(files)`; found folders are not descended into.
    macOS's AppleDouble entries (`._NAME`) are neither matched nor descended into."""
    found = set()
    for base in _dirs(key):
        if not os.path.isdir(base):
            continue
        for root, subdirs, files in os.walk(base, followlinks=True):
            subdirs[:] = [d for d in subdirs if not is_apple_double(d)]
            if root != base and is_match([f for f in files if not is_apple_double(f)]):
                found.add(os.path.relpath(root, base).replace(os.sep, "/"))
                subdirs[:] = []
    return sorted(found)


def shard_folders(key: str = INFINITY) -> list[str]:
    """Sharded transformers (the 8B): folders under models/infinity (or `key`) holding a `*.index.json`."""
    return _walk_folders(key, lambda files: any(_is_index(f) for f in files))


def _files(key: str) -> list[str]:
    """ComfyUI's cached listing of `key`, rebuilt when one of its folders was deleted while the server runs."""
    if key not in folder_paths.folder_names_and_paths:
        return []
    try:
        names = folder_paths.get_filename_list(key)
    except FileNotFoundError:
        # ComfyUI checks the cached listing by the mtime of every folder it saw, and a deleted folder makes that
        # check raise (0.3.75 and 0.33.0): drop the stale entry; a fresh scan skips folders that are not there.
        folder_paths.filename_list_cache.pop(key, None)
        try:
            names = folder_paths.get_filename_list(key)
        except FileNotFoundError:  # deleted again mid-scan: an empty menu now, listed afresh next time
            folder_paths.filename_list_cache.pop(key, None)
            return []
    names = [f.replace(os.sep, "/") for f in names]
    return [f for f in names if not any(is_apple_double(part) for part in f.split("/"))]  # macOS's `._NAME` files


def _looks_like_vae(name: str) -> bool:
    return "vae" in os.path.basename(name).lower()


def infinity_files() -> list[str]:
    """Checkpoint files in models/infinity, without the shards of shard folders."""
    shards = shard_folders()
    return [f for f in _files(INFINITY) if not any(f.startswith(s + "/") for s in shards)]


def diffusion_model_transformers() -> list[str]:
    """Files and shard folders of models/diffusion_models whose name says "infinity" (not their shards)."""
    named = lambda n: DIFFUSION_MODELS_WORD in n.lower()  # noqa: E731
    shards = [s for s in shard_folders(DIFFUSION_MODELS) if named(s)]
    files = [f for f in _files(DIFFUSION_MODELS) if named(f) and not any(f.startswith(s + "/") for s in shards)]
    return files + shards


def transformer_choices() -> list[str]:
    """Transformer files and shard folders of models/infinity and the Infinity ones of models/diffusion_models;
    names containing 'vae' last."""
    names = sorted(set(infinity_files()) | set(shard_folders()) | set(diffusion_model_transformers()))
    return [n for n in names if not _looks_like_vae(n)] + [n for n in names if _looks_like_vae(n)]


def vae_choices() -> list[str]:
    """VAE-named files of models/infinity, then models/vae, then the other files of models/infinity."""
    inf = infinity_files()
    out: list[str] = []
    for name in ([n for n in inf if _looks_like_vae(n)] + _files(VAE) + _files(DEFAULT_VAE_KEY)
                 + [n for n in inf if not _looks_like_vae(n)]):
        if name not in out:
            out.append(name)
    return out


def host_t5_tokenizer() -> str | None:
    """The T5 tokenizer folder ComfyUI ships (comfy/text_encoders/t5_tokenizer), which single-file T5s use."""
    import comfy.model_management

    folder = os.path.join(os.path.dirname(comfy.model_management.__file__), "text_encoders", "t5_tokenizer")
    return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


_t5_file_cache: dict[tuple[str, float], bool] = {}


def _is_t5_file(path: str) -> bool:
    """A .safetensors whose header holds a T5 encoder's first attention (read once per file and mtime)."""
    from safetensors import safe_open

    from ..scalekv_core.model.text_encoder import T5_PROBE_KEY

    try:
        key = (path, os.path.getmtime(path))
        if key not in _t5_file_cache:
            with safe_open(path, "pt") as f:
                _t5_file_cache[key] = T5_PROBE_KEY in f.keys()
        return _t5_file_cache[key]
    except Exception:  # unreadable or not safetensors: not offered
        return False


def single_file_t5s() -> list[str]:
    """Single-file T5 encoders in models/text_encoders ('t5' in the name), offered where ComfyUI ships a T5
    tokenizer for them."""
    if host_t5_tokenizer() is None:
        return []
    names = [f for f in _files(TEXT_ENCODERS) if "t5" in os.path.basename(f).lower() and f.endswith(".safetensors")]
    found = []
    for name in names:
        path = next((os.path.join(d, name) for d in _dirs(TEXT_ENCODERS) if os.path.isfile(os.path.join(d, name))), None)
        if path is not None and _is_t5_file(path):
            found.append(name)
    return found


def text_encoder_choices() -> list[str]:
    """T5 folders (any folder with a config.json) under models/text_encoders, then single-file T5 encoders; names
    containing 't5' first."""
    names = list(dict.fromkeys(n for key in (TEXT_ENCODERS, DEFAULT_TEXT_ENCODERS_KEY)
                               for n in _walk_folders(key, lambda files: "config.json" in files)))
    folders = [n for n in names if "t5" in n.lower()] + [n for n in names if "t5" not in n.lower()]
    return folders + [f for f in single_file_t5s() if f not in folders]


def default_choice(choices: list[str], name: str) -> str | None:
    """The embedded model's name as a menu default when it is installed; else None (the menu's first entry)."""
    return name if name in choices else None


def budget_file_choices() -> list[str]:
    """Budget files in models/scalekv (the calibration side files excluded)."""
    return [f for f in _files(SCALEKV) if not f.endswith(ASI_SUFFIX)]  # measurements, not budgets


# ------------------------------------------------------------------------------------------------ lookups


def _require(name: str, what: str, *keys: str) -> str:
    """An empty menu (no files yet) sends no name: say where the files go instead of 'no name'."""
    if not isinstance(name, str) or not name.strip():
        raise FileNotFoundError(f"no {what} selected: none found in {_searched(*keys)}")
    return clean_name(name)


def _find(name: str, what: str, keys: tuple[str, ...], accept, hint: str = "") -> str:
    """The first of the folders registered under `keys` holding `name` in the accepted form, or an error naming it."""
    rel = _require(name, what, *keys)
    for base in [d for key in keys for d in _dirs(key)]:
        path = os.path.join(base, rel)
        if _inside(base, path) and accept(path):  # clean_name's rule, checked again as this OS joins paths
            return path
    raise FileNotFoundError(f"{what} {shown(name)} not found in {_searched(*keys)}{hint}")


def resolve_transformer(name: str) -> str:
    return _find(name, "Infinity transformer", (INFINITY, DIFFUSION_MODELS),
                 lambda p: os.path.isfile(p) or _is_shard_folder(p),
                 "; put the checkpoint file (or the 8B's shard folder with its *.index.json) there")


def resolve_vae(name: str) -> str:
    return _find(name, "VAE file", (VAE, INFINITY, DEFAULT_VAE_KEY), os.path.isfile)


def resolve_text_encoder(name: str) -> str:
    """A T5 folder, or a single-file T5 (.safetensors) where ComfyUI ships the tokenizer it needs."""
    single = host_t5_tokenizer() is not None and str(name).endswith(".safetensors")
    return _find(name, "T5 text encoder folder", (TEXT_ENCODERS, DEFAULT_TEXT_ENCODERS_KEY),
                 (lambda p: os.path.isfile(os.path.join(p, "config.json"))
                  or (single and os.path.isfile(p) and _is_t5_file(p))),
                 "; it is a Hugging Face folder (config.json, weights, tokenizer.json or spiece.model) such as "
                 "flan-t5-xl, or a single-file T5 encoder (.safetensors)")


def resolve_budget_file(name: str) -> str:
    return _find(name, "budget file", (SCALEKV,), os.path.isfile,
                 "; run ScaleKV Calibrate or copy a ScaleKV budget JSON there")


def fingerprint(resolve: Callable[[str], str], name: object) -> str:
    """The current version of the file or folder a menu name resolves to (checkpoint.file_version), for ComfyUI's
    fingerprint_inputs: a file replaced under the same name, even by one of the same size and time, is read again
    rather than served from ComfyUI's cache; "missing" where it does not resolve (validation names the problem)."""
    try:
        return repr(file_version(resolve(name)))  # type: ignore[arg-type]
    except (OSError, ValueError):
        return "missing"


def budget_output_path(name: str) -> str:
    """Where a new budget file goes: the first models/scalekv folder (a user's configured one comes first)."""
    dirs = _dirs(SCALEKV)
    if not dirs:
        raise RuntimeError("no models/scalekv folder is registered")
    path = os.path.join(dirs[0], new_file_name(name))
    if not _inside(dirs[0], path):  # new_file_name's rule, checked again as this OS joins paths
        raise ValueError(f"{shown(name)} is not a name inside a model folder")
    return path


def budget_file_from_report(value: str) -> str:
    """A memory report's budget file (the path the config node resolved) back to a file inside models/scalekv.

    A report comes back from the browser, so its path is untrusted: only a file under a registered models/scalekv
    folder (or a bare name there) is accepted, exactly as the node resolves names. The node's path is the folder
    joined with the name, not resolved through symlinks, so the same rule holds here: `models/scalekv/mine.json`
    that is a symlink to a file elsewhere is accepted (the node reads it), while '..' cannot climb out.
    """
    if not os.path.isabs(value):
        return resolve_budget_file(value)
    for resolve in (os.path.normpath, os.path.realpath):  # as the node wrote it; or fully resolved (a symlinked folder)
        path = resolve(value)
        for base in _dirs(SCALEKV):
            root = resolve(os.path.abspath(base))
            # _inside: a folder on another drive is not this file's (commonpath raised, ending the search early)
            if _inside(root, path) and os.path.normcase(path) != os.path.normcase(root):
                return resolve_budget_file(os.path.relpath(path, root))
    raise ValueError(f"budget file {shown(os.path.basename(value))} is not in {FOLDER_LABELS[SCALEKV]}")
