"""Every field the config parser reads is type-checked: a wrong type is refused with
`invalid_config` naming the field, never a TypeError (a 500) or a value stored as is."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig

from lorafold.adapters import open_adapter, parse_config
from lorafold.errors import InvalidAdapter
from tests.adapter_cases import good_adapter
from tests.peft_models import make_peft_adapter, tiny_embed_conv, tiny_gpt2, tiny_llama

GOOD: dict[str, Any] = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
    "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    "base_model_name_or_path": "synthetic/llama",
}

# field -> wrong values; each must be refused with invalid_config naming the field.
WRONG: dict[str, list[Any]] = {
    "peft_type": [5, ["LORA"]],
    "r": ["8", 8.0, True, 0, -2, None, [4]],
    "lora_alpha": ["8", True, math.nan, math.inf, 10**400, {}],
    "use_rslora": ["yes", 1, [True]],
    "fan_in_fan_out": [1, "false"],
    "use_dora": ["no", 0],
    "lora_bias": ["false", 1],
    "bias": [5, True, ["none"]],
    "modules_to_save": ["lm_head", 5, [1]],
    "layer_replication": [5, "x"],
    "target_parameters": ["x", 5],
    "target_modules": [5, [1, 2], {"q_proj": 1}, True],
    "rank_pattern": ["x", 5, ["q_proj"]],
    "alpha_pattern": ["x", 5.0, [1]],
    "base_model_name_or_path": [123, ["llama"], {"name": "x"}, False],
    "task_type": [5, ["CAUSAL_LM"]],
    "layers_to_transform": ["0", -1, [0, "1"], [-1], True, 1.5],
    "layers_pattern": [5, [1]],
    "exclude_modules": [5, [None]],
}
WRONG_PATTERN_VALUES: list[tuple[str, Any]] = [
    ("rank_pattern", "x"), ("rank_pattern", 2.0), ("rank_pattern", 0), ("rank_pattern", True),
    ("rank_pattern", None), ("alpha_pattern", "x"), ("alpha_pattern", math.nan),
    ("alpha_pattern", False), ("alpha_pattern", [1]),
]


@pytest.mark.parametrize(("name", "value"),
                         [(name, value) for name, values in WRONG.items() for value in values])
def test_a_wrong_type_is_refused_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(InvalidAdapter) as err:
        parse_config({**GOOD, name: value})
    assert err.value.code == "invalid_config"
    assert f"adapter_config.json: {name} must be" in err.value.message


@pytest.mark.parametrize(("name", "value"), WRONG_PATTERN_VALUES)
def test_a_wrong_pattern_value_is_refused_naming_the_key(name: str, value: Any) -> None:
    with pytest.raises(InvalidAdapter) as err:
        parse_config({**GOOD, name: {"v_proj": value}})
    assert err.value.code == "invalid_config"
    assert f"{name}['v_proj'] must be" in err.value.message


def test_the_refusal_comes_through_open_adapter(tmp_path: Path) -> None:
    """The three the attacker sent, as files (the upload path)."""
    for name, value in (("target_modules", 5), ("rank_pattern", "x"),
                        ("base_model_name_or_path", 123)):
        directory = good_adapter(tmp_path / name)
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, name: value}))
        with pytest.raises(InvalidAdapter) as err:
            open_adapter(directory)
        assert err.value.code == "invalid_config"
        assert name in err.value.message


def test_a_huge_wrong_value_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidAdapter) as err:
        parse_config({**GOOD, "target_modules": [1] * 100_000})
    assert len(err.value.message) < 300


def test_null_means_the_default() -> None:
    nulls = {name: None for name in WRONG if name not in ("r",)}
    settings = parse_config({"r": 4, **nulls})
    assert settings.lora_alpha == 4.0 and not settings.use_rslora
    assert settings.target_modules is None and settings.base_model_name_or_path is None
    assert dict(settings.rank_pattern) == {} and dict(settings.alpha_pattern) == {}


def test_right_types_parse_to_those_values() -> None:
    settings = parse_config({**GOOD, "lora_alpha": 16.5, "use_rslora": True,
                             "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3},
                             "layers_to_transform": [0, 1], "layers_pattern": "layers",
                             "exclude_modules": ["lm_head"], "target_modules": "q_proj|v_proj",
                             "modules_to_save": [], "layer_replication": None})
    assert settings.lora_alpha == 16.5 and settings.use_rslora
    assert settings.target_modules == "q_proj|v_proj"
    assert settings.rank_for("base_model.model.model.layers.0.self_attn.v_proj") == 2
    assert settings.alpha_for("model.layers.0.self_attn.q_proj") == 3.0
    assert parse_config({**GOOD, "layers_to_transform": 3}).r == 4


def test_refusals_of_supported_types_keep_their_codes() -> None:
    for changes, code in (({"peft_type": "IA3"}, "unsupported_peft_type"),
                          ({"use_dora": True}, "dora_not_supported"),
                          ({"lora_bias": True}, "lora_bias_not_supported"),
                          ({"bias": "all"}, "bias_not_supported"),
                          ({"modules_to_save": ["lm_head"]}, "modules_to_save_not_supported"),
                          ({"layer_replication": [[0, 1]]}, "unsupported_config")):
        with pytest.raises(InvalidAdapter) as err:
            parse_config({**GOOD, **changes})
        assert err.value.code == code


PEFT_CONFIGS = [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
               rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3}),
    LoraConfig(r=6, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True,
               layers_to_transform=[0, 1], layers_pattern="layers", task_type="CAUSAL_LM"),
    LoraConfig(r=3, lora_alpha=3, target_modules=r".*\.(q|k)_proj", exclude_modules=["lm_head"]),
    LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"),
    LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], layers_to_transform=1),
    LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
               rank_pattern={r"h\.1\.attn\.c_attn": 2}),
]


@pytest.mark.parametrize("index", range(len(PEFT_CONFIGS)))
def test_configs_written_by_peft_parse(index: int, tmp_path: Path) -> None:
    PEFT_CONFIGS[index].save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    settings = parse_config(raw)
    assert settings.r == raw["r"] and settings.lora_alpha == raw["lora_alpha"]


def test_peft_adapters_and_the_catalogue_good_adapter_open(tmp_path: Path) -> None:
    with open_adapter(good_adapter(tmp_path / "good")) as adapter:
        assert adapter.summary()["base_model"] == "synthetic/llama"
    built = [
        make_peft_adapter(tiny_llama, tmp_path / "llama", PEFT_CONFIGS[0], seed=1),
        make_peft_adapter(tiny_gpt2, tmp_path / "gpt2", PEFT_CONFIGS[5], seed=2),
        make_peft_adapter(tiny_embed_conv, tmp_path / "emb",
                          LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "lin", "conv"]),
                          seed=3),
    ]
    for path in built:
        with open_adapter(path) as adapter:
            adapter.validate()
    with open_adapter(built[0]) as adapter:
        ranks = {name.rsplit(".", 1)[-1]: spec.rank for name, spec in adapter.modules.items()}
        assert ranks == {"q_proj": 4, "v_proj": 2, "up_proj": 4}
    with open_adapter(built[1]) as adapter:
        assert {s.rank for n, s in adapter.modules.items() if ".h.1." in n} == {2}


@pytest.mark.parametrize("text", ["{\"r\": 1" + "0" * 5000 + "}",
                                  "[" * 100_000 + "]" * 100_000])
def test_configs_json_cannot_parse_are_invalid_config_not_a_crash(tmp_path: Path,
                                                                  text: str) -> None:
    """An integer longer than Python converts, nesting deeper than it recurses: 500s once."""
    directory = good_adapter(tmp_path / "a")
    (directory / "adapter_config.json").write_text(text)
    with pytest.raises(InvalidAdapter) as info:
        open_adapter(directory)
    assert info.value.code == "invalid_config"


def test_an_oversized_config_is_refused_unread(tmp_path: Path) -> None:
    directory = good_adapter(tmp_path / "a")
    config = json.loads((directory / "adapter_config.json").read_text())
    config["padding"] = "x" * (2 * 1024 * 1024)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapter) as info:
        open_adapter(directory)
    assert info.value.code == "invalid_config" and "larger than" in info.value.message
