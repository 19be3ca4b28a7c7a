"""Numbers and keys in the JSON and metadata the engine reads: budget files, shard indexes, safetensors headers and
pre-quantized metadata. Whatever a file holds, the error is the module's own type and names the file and the key;
Python's bare ValueErrors (int() of '²', the 4300-digit int-string limit) never escape.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalekv_core.checkpoint import CheckpointError, safetensors_metadata, shard_index
from scalekv_core.safe_files import MAX_JSON_DIGITS, JSONNumberError, is_decimal, parse_json, whole_number
from scalekv_core.kvcache.budget import BudgetError, load_budget_file, plan_from_original_json, preset_path
from scalekv_core.model import quant
from scalekv_core.schedules import get_schedule

ONE_K = get_schedule(1.0, "1M")  # the 13-scale 1024x1024 schedule the 2B preset is for
LAYERS, BASE = 32, 650
BIG = "9" * 5000  # past Python's 4300-digit limit on int()


def _preset() -> dict:
    return json.loads(preset_path("infinity-2b-10pct").read_text())


def _budget(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "budget.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _load(path: Path):
    return load_budget_file(path, ONE_K, LAYERS, BASE)


def _refused(tmp_path: Path, data: dict, pattern: str) -> tuple[Path, str]:
    """`data` written as a budget file and loaded: the BudgetError (matching `pattern`) and the file's path."""
    path = _budget(tmp_path, data)
    with pytest.raises(BudgetError, match=pattern) as e:
        _load(path)
    return path, str(e.value)


# ------------------------------------------------------------------------------------------ the shared rules


def test_whole_number_is_ascii_decimal_and_bounded() -> None:
    assert [whole_number(t, 9) for t in ("0", "7", "0009", "00")] == [0, 7, 9, 0]
    for text in ("²", "٣", "7²", "", " 7", "7\n", "-1", "+1", "1.0", "10", "1" + "0" * 5000, 7, None):
        assert whole_number(text, 9) is None, text
    assert whole_number("0" * 5000 + "5", 9) == 5  # leading zeros never reach int()
    assert is_decimal("0123") and not is_decimal("²") and not is_decimal("")


def test_parse_json_names_the_key_of_a_long_number() -> None:
    assert parse_json('{"a": [1, -2, 2.5, ' + "9" * MAX_JSON_DIGITS + "]}") == \
        {"a": [1, -2, 2.5, int("9" * MAX_JSON_DIGITS)]}
    with pytest.raises(JSONNumberError, match=r"'Scale 9\.Max' is a number of 5000 digits"):
        parse_json('{"Scale 9": {"Max": ' + BIG + "}}")
    with pytest.raises(JSONNumberError, match=r"'a\[1\]' is a number of 5000 digits"):
        parse_json('{"a": [0, -' + BIG + "]}")
    with pytest.raises(JSONNumberError, match="a value is a number of 5000 digits"):  # replaced by a duplicate key
        parse_json('{"a": ' + BIG + ', "a": 1}')


# ------------------------------------------------------------------------------------------ budget files


def test_valid_budget_file_reads_as_before(tmp_path: Path) -> None:
    data = _preset()
    plan = _load(_budget(tmp_path, data))
    assert plan.kept == plan_from_original_json(data, ONE_K, LAYERS, BASE).kept
    assert plan.kept[-1][:4] == [6385, 465, 465, 465]
    spaced = {k.replace("Scale ", "Scale   ") + " ": v for k, v in data.items()}  # 'Scale   9 ' reads as before
    assert plan_from_original_json(spaced, ONE_K, LAYERS, BASE).kept == plan.kept


@pytest.mark.parametrize("key", ["Scale ²", "Scale ٣", "Scale 1²"])
def test_unicode_digit_scale_key_is_named(tmp_path: Path, key: str) -> None:
    data = _preset()
    data[key] = data["Scale 9"]
    path, message = _refused(tmp_path, data, rf"unexpected field '{key}'")
    assert str(path) in message


def test_unicode_digit_block_key_is_named(tmp_path: Path) -> None:
    data = _preset()
    data["Scale 9"]["Block ²"] = 0
    path, message = _refused(tmp_path, data, r"'Scale 9' is for another depth.*'Block ²'")
    assert str(path) in message


def test_huge_scale_number_is_named(tmp_path: Path) -> None:
    data = _preset()
    data["Scale " + BIG] = data["Scale 9"]
    path, message = _refused(tmp_path, data, "names a scale far past the schedule's 13")
    assert str(path) in message


@pytest.mark.parametrize("field", ["Max", "Min"])
def test_long_number_in_budget_file_is_named(tmp_path: Path, field: str) -> None:
    text = json.dumps(_preset()).replace(f'"{field}": ', f'"{field}": {BIG}', 1)  # 9999...<old value>
    path = _budget(tmp_path, text)
    with pytest.raises(BudgetError, match=rf"'Scale 9\.{field}' is a number of 50\d\d digits") as e:
        _load(path)
    assert str(path) in str(e.value)


def test_long_number_in_an_ignored_budget_field_is_named(tmp_path: Path) -> None:
    text = json.dumps(_preset()).replace('"Limit": ', f'"Limit": {BIG}', 1)
    path = _budget(tmp_path, text)
    with pytest.raises(BudgetError, match=r"'Scale 9\.Limit' is a number of"):
        _load(path)


@pytest.mark.parametrize("field, value", [("Min", -5), ("Min", 0), ("Max", -1), ("Max", 0)])
def test_non_positive_cap_names_file_and_field(tmp_path: Path, field: str, value: int) -> None:
    data = _preset()
    data["Scale 9"][field] = value
    path, message = _refused(tmp_path, data, rf"'Scale 9\.{field}' must be an integer from 1 to 10521.*got {value}$")
    assert message.startswith(f"{path}: ")


def test_cap_past_the_schedule_names_file_and_field(tmp_path: Path) -> None:
    data = _preset()
    data["Scale 10"]["Max"] = 10**50
    path, message = _refused(tmp_path, data, r"'Scale 10\.Max' must be an integer from 1 to 10521")
    assert message.startswith(f"{path}: ")
    data["Scale 10"]["Max"] = sum(ONE_K.tokens_per_scale)  # the whole schedule is still a count a layer can hold
    plan = _load(_budget(tmp_path, data))
    assert plan.kept[8][0] == plan.kept[7][0] + ONE_K.tokens_per_scale[8]  # uncapped: keeps all it has


def test_budget_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    path.write_bytes(b'{"Scale 9": "\xff"}')
    with pytest.raises(BudgetError) as e:
        _load(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------ checkpoints


def test_long_number_in_shard_index_is_named(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {"total_size": ' + BIG + '}, "weight_map": {}}')
    with pytest.raises(CheckpointError, match=r"'metadata\.total_size' is a number of 5000 digits") as e:
        shard_index(tmp_path)
    assert str(index) in str(e.value)


def _safetensors(path: Path, header: str) -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    return path


def test_long_number_in_safetensors_header_is_named(tmp_path: Path) -> None:
    good = '{"__metadata__": {"format": "pt"}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    assert safetensors_metadata(_safetensors(tmp_path / "ok.safetensors", good + "}")) == {"format": "pt"}
    path = _safetensors(tmp_path / "big.safetensors", good + ', "x_extra": ' + BIG + "}")
    with pytest.raises(CheckpointError, match=r"unreadable safetensors header: 'x_extra' is a number of 5000") as e:
        safetensors_metadata(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------ pre-quantized metadata


def _meta(**edits: str) -> dict[str, str]:
    meta = {quant.META_FORMAT: "int8", quant.META_VERSION: "1", quant.META_GROUP: "64"}
    meta.update(edits)
    return meta


def test_valid_quant_metadata_reads_as_before() -> None:
    assert quant.file_format(_meta(), "x.safetensors") == ("int8", 64)
    assert quant.file_format(_meta(scalekv_version="01", scalekv_group_size="0064"), "x.safetensors") == ("int8", 64)
    assert quant.file_format(_meta(scalekv_group_size=str(2**20)), "x.safetensors") == ("int8", 2**20)


@pytest.mark.parametrize("key", [quant.META_VERSION, quant.META_GROUP])
@pytest.mark.parametrize("value", ["²", "٣", BIG, "0" * 5000 + "1" + "0" * 5000, str(2**20 + 1), "-1", ""])
def test_bad_quant_number_is_named(key: str, value: str) -> None:
    if key == quant.META_VERSION and value == str(2**20 + 1):
        value = "2"
    with pytest.raises(CheckpointError, match=rf"^/m/x\.safetensors: metadata {key} = ") as e:
        quant.file_format(_meta(**{key: value}), "/m/x.safetensors")
    assert len(str(e.value)) < 400  # the value is quoted in short


def test_a_budget_file_for_another_model_or_resolution_says_which(tmp_path: Path) -> None:
    """The released 2B preset on a 4-layer model names both depths; a file calibrated at 256x256 run where its
    caps do not reach names the resolution and budget it was calibrated for (both were said in file-format terms:
    "'Scale 9' is for another depth", "no entry 'Scale 8' ... another schedule")."""
    from scalekv_core.kvcache.budget import plan_from_original_json, plan_to_original_json, scalekv_plan
    from scalekv_core.schedules import get_schedule

    with pytest.raises(BudgetError, match=r"for a model of 32 layers, but this model has 4 \(Infinity-2B has 32"):
        load_budget_file(preset_path("infinity-2b-10pct"), get_schedule(1.0, "1M"), 4, base_capacity=650)
    small, large = get_schedule(1.0, "0.06M"), get_schedule(1.0, "0.25M")
    path = tmp_path / "mine_256x256_10pct.json"
    path.write_text(json.dumps(plan_to_original_json(scalekv_plan(small, 4, 27, [0], window=4))))
    (tmp_path / "mine_256x256_10pct.asi.json").write_text(json.dumps(
        {"settings": {"schedule": {"template": 1.0, "size": "0.06M"}, "budget_tokens": 27}}))
    with pytest.raises(BudgetError, match=r"mine_256x256_10pct.json: the file caps scales .* \(calibrated at "
                                          r"256x256 \(1:1\) for 27 tokens\), but this run's cache passes its budget "
                                          r"of 27 tokens at scale"):
        plan_from_original_json(json.loads(path.read_text()), large, 4, 27, source=str(path))
