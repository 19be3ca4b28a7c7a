"""The one budget type: how many tokens each layer keeps after each scale, and the generators that fill it.

A `BudgetPlan` says, for every scale but the last (nothing is stored after the last scale) and every layer, how
many cached tokens the layer keeps once the scale's attention is done. Policies decide *which* tokens; the plan
decides *how many*. The original ScaleKV JSON format ("Scale N" / "Block i" / Max / Min) reads and writes here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..safe_files import JSONNumberError, is_decimal, parse_json, whole_number
from ..limits import shown
from ..schedules import Schedule

#: Floor of a refiner's budget in the original 10% files (binds only for 8B at scale 13).
REFINER_FLOOR = 200
PRESETS_DIR = Path(__file__).parent / "presets"
#: Built-in presets: the original release's 10% files for 1024x1024.
PRESETS = {"infinity-2b-10pct": "infinity-2b-10pct.json", "infinity-8b-10pct": "infinity-8b-10pct.json"}


class BudgetError(ValueError):
    """A budget that cannot be applied; the message names the field or value."""


@dataclass
class BudgetPlan:
    """Tokens kept per layer after each scale (`kept[scale][layer]`), for one schedule and depth."""

    tokens_per_scale: tuple[int, ...]
    kept: list[list[int]]  # len = num_scales - 1; each row has num_layers entries
    drafters: list[list[int]] = field(default_factory=list)  # per scale, the layers with a large budget
    source: str = ""
    #: What a user should know about this plan (a budget file calibrated for another budget); shown, never fatal.
    notes: list[str] = field(default_factory=list)
    #: What the original would prune the last scale's cache to; never stored here, only used to record its choice.
    final_caps: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens_per_scale)
        if len(self.kept) != n - 1:
            raise BudgetError(f"budget plan has {len(self.kept)} scale rows for a {n}-scale schedule "
                              f"(one per scale but the last)")
        layers = {len(row) for row in self.kept}
        if len(layers) > 1:
            raise BudgetError(f"budget plan rows have different layer counts: {sorted(layers)}")
        if not self.drafters:
            self.drafters = [[] for _ in range(n)]
        prev = [0] * self.num_layers
        for si, row in enumerate(self.kept):
            for layer, k in enumerate(row):
                if k <= 0:
                    raise BudgetError(f"scale {si}, layer {layer}: a budget of {k} tokens; every layer needs at "
                                      f"least one")
                if k > prev[layer] + self.tokens_per_scale[si]:
                    raise BudgetError(f"scale {si}, layer {layer}: keeps {k} tokens but only "
                                      f"{prev[layer] + self.tokens_per_scale[si]} exist")
            prev = row

    @property
    def num_layers(self) -> int:
        return len(self.kept[0]) if self.kept else 0

    @property
    def num_scales(self) -> int:
        return len(self.tokens_per_scale)

    def evicts(self, scale: int, layer: int) -> bool:
        """Whether the layer drops tokens after this scale (the last scale stores nothing and never evicts)."""
        if scale >= len(self.kept):
            return False
        before = self.kept[scale - 1][layer] if scale else 0
        return self.kept[scale][layer] < before + self.tokens_per_scale[scale]

    def stored_tokens(self, scale: int) -> int:
        """Tokens held over all layers after `scale`."""
        return sum(self.kept[scale]) if scale < len(self.kept) else 0

    def peak_stored_tokens(self) -> int:
        return max(self.stored_tokens(s) for s in range(len(self.kept))) if self.kept else 0

    def full_tokens(self) -> int:
        """What the full cache holds before the last scale, in all layers: the ratio's denominator."""
        return sum(self.tokens_per_scale[:-1]) * self.num_layers

    def to_dict(self) -> dict:
        return {"tokens_per_scale": list(self.tokens_per_scale), "kept": self.kept, "drafters": self.drafters,
                "source": self.source, "final_caps": self.final_caps, "notes": self.notes}


def _cumulative(tokens: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for n in tokens:
        acc += n
        out.append(acc)
    return out


def full_plan(schedule: Schedule, num_layers: int) -> BudgetPlan:
    """Keep everything: the full cache, which the original stores."""
    cum = _cumulative(schedule.tokens_per_scale)
    return BudgetPlan(schedule.tokens_per_scale, [[c] * num_layers for c in cum[:-1]], source="full")


def per_layer_plan(schedule: Schedule, layer_budgets: Sequence[int], source: str) -> BudgetPlan:
    """Each layer keeps at most its own fixed number of tokens (SnapKV-style uniform, or PyramidKV)."""
    cum = _cumulative(schedule.tokens_per_scale)
    return BudgetPlan(schedule.tokens_per_scale, [[min(c, b) for b in layer_budgets] for c in cum[:-1]],
                      source=source)


def uniform_plan(schedule: Schedule, num_layers: int, budget: int) -> BudgetPlan:
    """Every layer keeps `budget` tokens once the cache outgrows it."""
    _check_budget(budget, 1)
    return per_layer_plan(schedule, [budget] * num_layers, f"uniform {budget} tokens")


def pyramid_plan(schedule: Schedule, num_layers: int, budget: int, beta: float = 20.0,
                 min_tokens: int = 1) -> BudgetPlan:
    """PyramidKV: budgets fall linearly with depth, averaging `budget`; the deepest layer gets `budget/beta`.

    No layer gets less than `min_tokens` (the observation window), so small budgets flatten the pyramid. The
    bottom layer never gets more than the cache will hold (the prefix before the last scale): the top rises by as
    much, so the layers still average `budget`, and a budget of the whole prefix keeps everything.
    """
    _check_budget(budget, min_tokens)
    prefix = sum(schedule.tokens_per_scale[:-1])
    if budget >= prefix:
        plan = full_plan(schedule, num_layers)
        plan.source = f"pyramid {budget} tokens: the whole cache"
        return plan
    if num_layers == 1:
        return uniform_plan(schedule, 1, budget)
    top = min(budget, max(min_tokens, round(budget / beta)))
    bottom = min(2 * budget - top, prefix)
    top = 2 * budget - bottom
    step = (bottom - top) / (num_layers - 1)
    budgets = [max(1, round(bottom - step * i)) for i in range(num_layers)]
    budgets[0] += budget * num_layers - sum(budgets)  # exact total
    return per_layer_plan(schedule, budgets, f"pyramid {budget} tokens (beta {beta:g})")


def _check_budget(budget: int, window: int) -> None:
    if budget <= 0:
        raise BudgetError(f"a budget of {budget} tokens; it must be positive")
    if budget < window:
        raise BudgetError(f"a budget of {budget} tokens is below the observation window of {window} tokens")


def refiner_floor(budget: int, window: int) -> int:
    """Least a refiner keeps: 200 tokens as in the original files, scaled down for budgets under 600."""
    return min(REFINER_FLOOR, max(window, budget // 3))


def scalekv_rule(limit: int, budget: int, num_layers: int, num_drafters: int, refiner_min: int | None = None,
                 floor: int = REFINER_FLOOR) -> tuple[int, int]:
    """(Max, Min) for one scale, as the original 10% files have them: N_d·Max + N_r·Min = budget·L exactly.

    Drafters get as much as they can hold (at most `limit`) while refiners keep at least `floor`; Max is then
    lowered until Min is a whole number. With `refiner_min` (the decay option) refiners get that instead.
    """
    total = budget * num_layers
    n_r = num_layers - num_drafters
    if num_drafters <= 0:
        return budget, budget
    if n_r == 0:
        m = min(limit, total // num_drafters)
        return m, m
    if refiner_min is not None:
        mn = max(1, refiner_min)
        mx = min(limit, (total - n_r * mn) // num_drafters)
        return max(mx, 1), mn
    mx = min(limit, (total - floor * n_r) // num_drafters)
    while mx > 0 and (total - num_drafters * mx) % n_r:
        mx -= 1
    return mx, (total - num_drafters * mx) // n_r


def scalekv_plan(schedule: Schedule, num_layers: int, budget: int, drafters: Sequence[Sequence[int]] | Sequence[int],
                 refiner_decay: float = 0.0, window: int = 16) -> BudgetPlan:
    """ScaleKV budgets for any schedule and depth: drafters nearly uncompressed, refiners share the rest.

    Compression starts at the first scale whose cache passes `budget` tokens (the original's `max_capacity`).
    `drafters` is one layer list for every scale, or a list per scale. `refiner_decay` (tokens per compressed
    scale) makes refiner budgets shrink scale by scale, the paper's B_r(k) = B_r(0) - δk.
    """
    _check_budget(budget, window)
    n = schedule.num_scales
    per_scale = _drafters_per_scale(drafters, n, num_layers)
    cum = _cumulative(schedule.tokens_per_scale)
    kept: list[list[int]] = []
    prev_max = 0
    k = 0
    base_min: int | None = None
    for si in range(n - 1):
        if cum[si] <= budget:  # cumulative sizes only grow, so once compression starts it never stops
            kept.append([cum[si]] * num_layers)
            prev_max = cum[si]
            continue
        limit = prev_max + schedule.tokens_per_scale[si]
        ds = per_scale[si]
        refiner_min = None
        if refiner_decay and base_min is not None:
            refiner_min = max(window, int(round(base_min - refiner_decay * k)))
        mx, mn = scalekv_rule(limit, budget, num_layers, len(ds), refiner_min, refiner_floor(budget, window))
        if base_min is None:
            base_min = mn
        prev_row = kept[-1] if kept else [0] * num_layers
        row = [min(prev_row[layer] + schedule.tokens_per_scale[si], mx if layer in ds else mn)
               for layer in range(num_layers)]
        kept.append(row)
        prev_max = mx
        k += 1
    return BudgetPlan(schedule.tokens_per_scale, kept, [list(d) for d in per_scale],
                      source=f"scalekv {budget} tokens" + (f", refiner decay {refiner_decay:g}" if refiner_decay else ""))


def _drafters_per_scale(drafters: Sequence[Sequence[int]] | Sequence[int], n: int, num_layers: int) -> list[list[int]]:
    if drafters and isinstance(drafters[0], (list, tuple)):
        per = [list(d) for d in drafters]  # type: ignore[arg-type]
        if len(per) != n:
            raise BudgetError(f"drafters given for {len(per)} scales; the schedule has {n}")
    else:
        per = [list(drafters) for _ in range(n)]  # type: ignore[arg-type]
    for si, ds in enumerate(per):
        bad = [d for d in ds if not 0 <= int(d) < num_layers]
        if bad:
            raise BudgetError(f"scale {si}: drafter layers {bad} do not exist in a {num_layers}-layer model")
    return per


def default_drafters(num_layers: int) -> list[int]:
    """Drafters when nothing is calibrated: the layers the original 2B/8B files chose, else the first layer."""
    if num_layers == 32:
        return [0, 23]
    if num_layers == 40:
        return [0, 1, 2]
    return [0]


# ---------------------------------------------------------------------------------------------- original JSON


#: Largest scale or block number a budget file's key is read as; larger ones are refused before int() sees them.
_MAX_INDEX = 10**6


def _block_order(key: str) -> int:
    """Sort 'Block i' keys by i; a key that names no block number sorts first."""
    number = whole_number(key[6:], _MAX_INDEX)
    return -1 if number is None else number


def _cap_error(source: str, key: str, f: str, value: object, most: int) -> BudgetError:
    return BudgetError(f"{source}: field {shown(f'{key}.{f}')} must be an integer from 1 to {most} (a count of "
                       f"tokens, at most the schedule's), got {shown(value)}")


def plan_from_original_json(data: Mapping, schedule: Schedule, num_layers: int, base_capacity: int,
                            source: str = "budget file") -> BudgetPlan:
    """Apply an original ScaleKV budget file: "Scale N" caps the cache while generating 1-based scale N.

    Nothing is dropped until the cache passes `base_capacity` tokens (the original's `max_capacity`, 650 in
    every official script). From then on, after 0-based scale s the layer keeps at most the "Scale s+2" cap.
    """
    if not isinstance(data, Mapping):
        raise BudgetError(f"{source}: expected a JSON object of 'Scale N' entries")
    n = schedule.num_scales
    most = sum(schedule.tokens_per_scale)  # no layer ever holds more than the whole schedule's tokens
    caps: dict[int, list[int]] = {}
    drafters: dict[int, list[int]] = {}
    for key, entry in data.items():
        digits = key[6:].strip() if isinstance(key, str) and key.startswith("Scale ") else ""
        if not is_decimal(digits):
            raise BudgetError(f"{source}: unexpected field {shown(key)}; entries are named 'Scale N' (N in the digits "
                              f"0-9)")
        number = whole_number(digits, _MAX_INDEX)
        if number is None:
            raise BudgetError(f"{source}: field {shown(key)} names a scale far past the schedule's {n}; the file is "
                              f"for another resolution")
        if not isinstance(entry, Mapping):
            raise BudgetError(f"{source}: field {shown(key)} must be an object")
        for f in ("Max", "Min"):
            if isinstance(entry.get(f), bool) or not isinstance(entry.get(f), int) or entry[f] < 1:
                raise _cap_error(source, key, f, entry.get(f), most)
        blocks = {k: v for k, v in entry.items() if isinstance(k, str) and k.startswith("Block ")}
        expected = {f"Block {i}" for i in range(num_layers)}
        if set(blocks) != expected:
            extra = sorted(set(blocks) - expected, key=_block_order)
            missing = sorted(expected - set(blocks), key=_block_order)
            if set(blocks) != {f"Block {i}" for i in range(len(blocks))}:  # not a whole model's: name the keys
                raise BudgetError(f"{source}: '{key}' is for another depth: the model has {num_layers} layers "
                                  f"(missing {missing[:5]}, unexpected {[k[:60] for k in extra[:5]]})")
            raise BudgetError(f"{source}: the file is for a model of {len(blocks)} layers{_made_for(source)}, but "
                              f"this model has {num_layers} (Infinity-2B has 32, 8B 40): a budget file fits the "
                              f"model it was made for; calibrate this one with ScaleKV Calibrate")
        for k, v in blocks.items():
            if v not in (0, 1):
                raise BudgetError(f"{source}: field '{key}.{k}' must be 0 (refiner) or 1 (drafter), got {v!r}")
        caps[number] = [entry["Max"] if blocks[f"Block {i}"] == 1 else entry["Min"] for i in range(num_layers)]
        drafters[number] = [i for i in range(num_layers) if blocks[f"Block {i}"] == 1]
    if not caps:
        raise BudgetError(f"{source}: no 'Scale N' entries")
    too_far = [s for s in caps if s > n + 1]  # 'Scale n+1' is what the original prunes after the last scale
    if too_far:
        raise BudgetError(f"{source}: has entries for scale(s) {sorted(too_far)} but the schedule has only {n} "
                          f"scales; the file is for another resolution")
    for key, entry in data.items():  # after the checks above, which say better what is wrong with another's file
        for f in ("Max", "Min"):
            if entry[f] > most:
                raise _cap_error(source, key, f, entry[f], most)
    cum = _cumulative(schedule.tokens_per_scale)
    kept: list[list[int]] = []
    reached = False
    prev = [0] * num_layers
    for si in range(n - 1):
        total = [p + schedule.tokens_per_scale[si] for p in prev]
        if not reached and cum[si] <= base_capacity:
            row = total
        else:
            reached = True
            cap = caps.get(si + 2)
            if cap is None:
                raise BudgetError(f"{source}: the file caps scales {min(caps) - 1} to {max(caps) - 1} (1-based: its "
                                  f"'Scale N' entries less one){_made_for(source)}, but this run's cache passes "
                                  f"its budget of {base_capacity} tokens at scale {si + 1} of {n}, which the file "
                                  f"does not cap: it was made for another resolution or budget; use the ones it "
                                  f"was calibrated for, or calibrate again")
            row = [min(t, c) for t, c in zip(total, cap)]
        kept.append(row)
        prev = row
    per_scale = [drafters.get(si + 2, []) for si in range(n)]
    plan = BudgetPlan(schedule.tokens_per_scale, kept, per_scale, source=source)
    final = caps.get(n + 1, caps.get(n))
    if final is not None and reached:
        prev_total = [p + schedule.tokens_per_scale[-1] for p in prev]
        plan.final_caps = [min(t, c) for t, c in zip(prev_total, final)]
    return plan


def _made_for(source: str) -> str:
    """ ' (calibrated at 256x256 (1:1) for 27 tokens)' from a calibrated file's measurement table, else ''."""
    from ..schedules import get_schedule, resolution_label

    settings = calibration_settings(source)
    made, tokens = settings.get("schedule"), settings.get("budget_tokens")
    try:
        where = f" at {resolution_label(get_schedule(float(made['template']), str(made['size'])))}"
    except (KeyError, TypeError, ValueError):
        where = ""
    budget = f" for {tokens} tokens" if isinstance(tokens, int) and not isinstance(tokens, bool) else ""
    return f" (calibrated{where}{budget})" if where or budget else ""


def plan_to_original_json(plan: BudgetPlan) -> dict:
    """Write a plan in the original format: one "Scale N" per compressing scale, drafters marked 1."""
    out: dict = {}
    prev_max = 0
    started = False
    for si, row in enumerate(plan.kept):
        started = started or any(plan.evicts(si, layer) for layer in range(plan.num_layers))
        if not started:
            prev_max = max(row)
            continue
        ds = set(plan.drafters[si]) if plan.drafters[si] else {row.index(max(row))}
        mx = max(row[i] for i in ds)
        rest = [row[i] for i in range(len(row)) if i not in ds]
        mn = min(rest) if rest else mx
        entry = {f"Block {i}": int(i in ds) for i in range(len(row))}
        entry.update({"High": len(ds), "Max": mx, "Min": mn, "Limit": prev_max + plan.tokens_per_scale[si]})
        out[f"Scale {si + 2}"] = entry
        prev_max = mx
    return out


#: Budget files are a few KB (one entry per scale and layer); anything larger is not one.
MAX_BUDGET_FILE_BYTES = 2**20


def read_budget_json(path: str | Path) -> object:
    """The parsed JSON of a budget file: a regular file (never a FIFO, device or folder) of at most 1 MB.

    FileNotFoundError if it is missing; BudgetError naming the file for anything else.
    """
    from ..safe_files import read_text

    path = Path(path)
    text = read_text(path, MAX_BUDGET_FILE_BYTES, "budget file", BudgetError)
    try:
        return parse_json(text)
    except json.JSONDecodeError as e:
        raise BudgetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except JSONNumberError as e:
        raise BudgetError(f"{path}: {e}") from None
    except ValueError as e:  # anything else json.loads refuses
        raise BudgetError(f"{path}: not a readable budget file: {shown(str(e), 200)}") from None
    except RecursionError:
        raise BudgetError(f"{path}: the JSON is nested too deeply to be a budget file") from None


def load_budget_file(path: str | Path, schedule: Schedule, num_layers: int, base_capacity: int) -> BudgetPlan:
    """Read an original-format budget JSON, with errors that name the file and the field."""
    data = read_budget_json(path)
    return plan_from_original_json(data, schedule, num_layers, base_capacity, source=str(path))


def resolve_budget_file(name: str | Path) -> Path:
    """A budget file's path: the file itself, or a built-in preset's when `name` is a preset name (no suffix)."""
    path = Path(name)
    if not path.exists() and not path.suffix:
        return preset_path(str(name))
    return path


#: Calibration writes its measurements beside each budget file as `<stem>.asi.json` (they are not a budget).
ASI_SUFFIX = ".asi.json"
#: Largest measurement table read for its settings (256 prompts and a 13 x 40 table are well under 1 MB).
MAX_ASI_TABLE_BYTES = 16 * 2**20


def asi_table_path(budget_file: str | Path) -> Path:
    """Where calibration writes the measurements a budget file was chosen from."""
    path = Path(budget_file)
    return path.with_name(path.stem + ASI_SUFFIX)


def calibration_settings(budget_file: str | Path) -> dict:
    """The settings a calibrated budget file was made with (its measurement table's); {} for a file without a
    readable table (the built-in presets, the original's files): what they feed is advice, never fatal."""
    from ..safe_files import read_text

    try:
        data = parse_json(read_text(asi_table_path(budget_file), MAX_ASI_TABLE_BYTES, "measurement table",
                                    BudgetError))
    except (OSError, ValueError, RecursionError):  # missing, a FIFO, too large, not JSON
        return {}
    settings = data.get("settings") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else {}


def calibration_notes(budget_file: str | Path, budget_tokens: int, schedule: Schedule) -> list[str]:
    """Sentences when a calibrated budget file is used otherwise than it was calibrated: at another budget (its
    caps are the calibration's while eviction starts at this budget, so the run is neither), or at another
    resolution with as many scales (its caps and drafters were chosen for other token maps)."""
    from ..schedules import get_schedule, resolution_label

    settings = calibration_settings(budget_file)
    name, notes = Path(budget_file).name, []
    tokens = settings.get("budget_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and 0 < tokens != budget_tokens:
        notes.append(f"{name} was calibrated for a budget of {tokens} tokens, but this cache config's budget is "
                     f"{budget_tokens}: the file's caps are for {tokens}; set the budget to {tokens} tokens, or "
                     f"calibrate again at this budget")
    made = settings.get("schedule")
    try:
        made_at = get_schedule(float(made["template"]), str(made["size"])) if isinstance(made, dict) else None
    except (KeyError, TypeError, ValueError):  # an unknown template or size: nothing to compare
        made_at = None
    if made_at is not None and made_at.grids != schedule.grids:
        notes.append(f"{name} was calibrated at {resolution_label(made_at)}, but this run is "
                     f"{resolution_label(schedule)}: its caps and drafters were chosen for other token maps; "
                     f"calibrate again at this resolution")
    return notes


def preset_path(name: str) -> Path:
    """Location of a built-in preset by name."""
    if name not in PRESETS:
        raise BudgetError(f"unknown budget preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    return PRESETS_DIR / PRESETS[name]


# ---------------------------------------------------------------------------------------------- budget specs


#: Bytes of the scale each token and head of a one-byte K/V format carries (float32; docs/kv_storage.md).
SCALE_BYTES = 4


def scale_bytes(itemsize: int) -> int:
    """Scale bytes per token and head for a storage element of `itemsize` bytes: every one-byte format is scaled."""
    return SCALE_BYTES if itemsize == 1 else 0


def kv_bytes_per_token(num_heads: int, head_dim: int, k_bytes: int, v_bytes: int, batch_rows: int) -> int:
    """Bytes one cached token costs in one layer, for all batch rows (CFG doubles the rows).

    One-byte formats (fp8_e4m3fn, int8) add their per-token, per-head scales, so every caller that passes element
    sizes counts quantized storage as the cache holds it.
    """
    per_head = head_dim * (k_bytes + v_bytes) + scale_bytes(k_bytes) + scale_bytes(v_bytes)
    return batch_rows * num_heads * per_head


def _number(text: str, spec: object) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget {shown(spec)}: expected a positive percentage ('10%'), tokens ('650') or MB "
                          f"('900MB')")
    return value


def parse_budget(spec: str | int | float, schedule: Schedule, num_layers: int | None = None,
                 bytes_per_token_layer: int | None = None) -> int:
    """A budget in tokens per layer from '10%' (of the cache before the last scale), '650' (tokens) or '900MB'.

    Percentages follow the paper: 10% of the 6425-token prefix at 1024x1024 is 650 tokens (rounded up to a
    multiple of 50 once the prefix passes 5000 tokens; exact below that).
    """
    prefix = sum(schedule.tokens_per_scale[:-1])
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
        raise BudgetError(f"budget {shown(spec)}: expected a percentage ('10%'), tokens ('650') or MB ('900MB')")
    text = str(spec).strip().lower().replace(" ", "")
    if text.endswith("%"):
        pct = _number(text[:-1], spec)
        if pct > 100:
            raise BudgetError(f"budget {shown(spec)} is more than the whole cache; use at most 100%")
        exact = pct / 100 * prefix
        tokens = math.ceil(exact / 50) * 50 if prefix > 5000 else math.ceil(exact)
    elif text.endswith("mb"):
        if num_layers is None or bytes_per_token_layer is None:
            raise BudgetError("a budget in MB needs the model's size and batch")
        tokens = int(_number(text[:-2], spec) * 2**20 // (num_layers * bytes_per_token_layer))
    elif text.endswith("tokens"):
        tokens = int(_number(text[:-6], spec))
    else:
        tokens = int(_number(text, spec))
    if tokens <= 0:
        raise BudgetError(f"budget {shown(spec)} gives {tokens} tokens per layer, too little to keep anything; "
                          f"raise it")
    return min(tokens, prefix)
