"""LoraConfig from a mapping: PEFT's key names accepted, unknown keys answered with the closest
known one, and every value type-checked when the config is built."""

from __future__ import annotations

import pytest

import loraforge as lf

LoraConfig = lf.LoraConfig


def test_peft_names_map_to_loraforge_names():
    ours = LoraConfig.from_dict({"r": 4, "alpha": 32, "dropout": 0.1, "init": "gaussian", "bias": "all"})
    theirs = LoraConfig.from_dict(
        {"r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "init_lora_weights": "gaussian", "bias": "all"}
    )
    assert theirs == ours
    keys = LoraConfig.canonical_keys({"lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q"]})
    assert keys == {"alpha": 8, "dropout": 0.0, "target_modules": ["q"]}


@pytest.mark.parametrize(
    "value, init",
    [(True, "default"), ("gaussian", "gaussian"), ("pissa", "pissa"), ("pissa_niter_4", "pissa")],
)
def test_init_lora_weights_values(value, init):
    assert LoraConfig.from_dict({"init_lora_weights": value}).init == init


@pytest.mark.parametrize("value", ["eva", "corda", "yes", 1])
def test_init_lora_weights_that_cannot_be_honoured_when_creating(value):
    # these need data or change the base in ways loraforge does not reproduce
    with pytest.raises(ValueError, match=r"init_lora_weights=.* is not supported"):
        LoraConfig.from_dict({"init_lora_weights": value})


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("rank", "r"),
        ("lora_r", "r"),
        ("lora_rank", "r"),
        ("alpah", "alpha"),
        ("lora_alhpa", "lora_alpha"),
        ("droput", "dropout"),
        ("target_module", "target_modules"),
        ("use_rs_lora", "use_rslora"),
    ],
)
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ValueError) as e:
        LoraConfig.from_dict({key: 4}, source="run.yaml: lora")
    msg = str(e.value)
    assert msg.startswith(f"run.yaml: lora: unknown LoRA config key {key!r} (did you mean {suggestion!r}?)")
    assert "\n" not in msg


def test_unknown_key_without_a_close_one_lists_the_known_keys():
    with pytest.raises(ValueError, match=r"unknown LoRA config key 'zzz'; known keys: r, alpha, ") as e:
        LoraConfig.from_dict({"zzz": 1})
    assert "did you mean" not in str(e.value) and "lora_alpha" in str(e.value)


def test_a_key_under_both_names_is_refused():
    with pytest.raises(ValueError, match=r"'alpha' is given twice \(as 'alpha' and as PEFT's 'lora_alpha'\)"):
        LoraConfig.from_dict({"lora_alpha": 16, "alpha": 8})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_rslora": "no"}, "use_rslora must be true or false, got 'no'"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"alpha": float("nan")}, "alpha must be a positive finite number, got nan"),
        ({"alpha": float("inf")}, "alpha must be a positive finite number, got inf"),
        ({"alpha": True}, "alpha must be a positive finite number"),
        ({"dropout": True}, r"dropout must be in \[0, 1\)"),
        ({"r": 4.0}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj(": 2}}, r"rank_pattern key 'q_proj\(' is not a valid regex \(missing \)"),
        ({"alpha_pattern": {"v": float("inf")}}, r"alpha_pattern\['v'\] must be a positive finite number"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must map module names"),
        ({"layers_to_transform": [True]}, "layers_to_transform must be a layer index or a list"),
        ({"layers_to_transform": [-1]}, "layers_to_transform must be a layer index or a list"),
        ({"modules_to_save": "score"}, r"modules_to_save must be a list of module names, got 'score'"),
    ],
)
def test_values_are_type_checked(kwargs, match):
    with pytest.raises(ValueError, match=f"LoraConfig.{match}"):
        LoraConfig(**kwargs)
    with pytest.raises(ValueError, match=f"^cfg: {match}"):  # one prefix, not "cfg: LoraConfig.…"
        LoraConfig.from_dict(kwargs, source="cfg")


def test_accepted_forms_still_normalise():
    cfg = LoraConfig(layers_to_transform=3, modules_to_save=("score",), target_modules=("q", "v"))
    assert (
        cfg.layers_to_transform == [3]
        and cfg.modules_to_save == ["score"]
        and cfg.target_modules == ["q", "v"]
    )
    assert LoraConfig(rank_pattern={"q_proj|v_proj": 2}).rank_and_alpha("model.layers.0.v_proj") == (2, 8.0)


def test_new_lora_switches_round_trip_through_peft():
    # use_dora, lora_bias, target_parameters, trainable_token_indices and LoftQ's settings go to
    # adapter_config.json under PEFT's names, PEFT reads them back, and so do we
    peft = pytest.importorskip("peft")
    cfg = LoraConfig(
        r=4, target_modules=["q"], use_dora=True, target_parameters=["experts.w"],
        trainable_token_indices={"embed": [3, 1]}, init="loftq", loftq_bits=4, loftq_iter=2,
    )  # fmt: skip
    d = cfg.to_peft_dict()
    assert (d["use_dora"], d["lora_bias"], d["init_lora_weights"]) == (True, False, "loftq")
    assert d["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    theirs = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"}).to_dict()
    for key in (
        "use_dora",
        "target_parameters",
        "trainable_token_indices",
        "loftq_config",
        "init_lora_weights",
    ):
        assert theirs[key] == d[key], key
    assert LoraConfig.from_peft_dict(d) == cfg
    random_b = LoraConfig.from_dict({"init_lora_weights": False, "lora_bias": True})
    assert (random_b.init, random_b.lora_bias, random_b.to_peft_dict()["init_lora_weights"]) == (
        False,
        True,
        False,
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"lora_bias": True, "init": "pissa"}, "lora_bias needs init 'default' or false"),
        ({"loftq_bits": 3}, "loftq_bits must be 2, 4 or 8"),
        ({"loftq_iter": 0}, "loftq_iter must be a positive integer"),
        ({"trainable_token_indices": [1, 1]}, "repeats a token id"),
        (
            {"trainable_token_indices": {"embed": []}},
            r"trainable_token_indices\['embed'\] must be a non-empty",
        ),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
    ],
)
def test_new_lora_switches_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kw)
