import pytest

from rlora import PRESETS, RLoraConfig

BAD = [
    ("r", 0),
    ("r", 2.5),
    ("r", True),
    ("num_heads", 0),
    ("num_heads", -3),
    ("alpha", 0),
    ("alpha", float("nan")),
    ("gamma", -1.0),
    ("gamma", float("inf")),
    ("head_dropout", 1.0),
    ("head_dropout", -0.1),
    ("head_dropout", "0.1"),
    ("head_init", "kaiming"),
    ("dropout_mode", "independent"),
    ("router_init", "normal"),
    ("correction", "exact"),
    ("down_projection", "blocks"),
    ("use_rslora", "yes"),
    ("bias", "all"),
    ("target_modules", []),
    ("target_modules", ""),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"RLoraConfig\.{field}\b"):
        RLoraConfig(**{field: value})


def test_per_head_down_projection_refuses_a_shared_dropout_mask():
    with pytest.raises(ValueError, match=r"RLoraConfig\.dropout_mode: must be 'per_head' with down_projection"):
        RLoraConfig(num_heads=3, down_projection="per_head", dropout_mode="shared")
    RLoraConfig(num_heads=1, down_projection="per_head", dropout_mode="shared")  # one head: nothing to share


def test_defaults_follow_the_paper():
    c = RLoraConfig()
    assert (c.gamma, c.head_init, c.dropout_mode, c.router_init, c.correction, c.down_projection) == (
        64.0, "random", "per_head", "kaiming", "mean", "shared")
    assert c.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    "preset,head_init,mode",
    [
        ("lora", "zero", "shared"),
        ("hydralora", "zero", "shared"),
        ("hydralora+mt", "zero", "per_head"),
        ("hydralora+init", "random", "shared"),
        ("rlora", "random", "per_head"),
        ("lora_moe", "zero", "per_head"),
    ],
)
def test_presets_are_the_paper_ablation_arms(preset, head_init, mode):
    c = RLoraConfig.from_preset(preset, r=4)
    assert (c.head_init, c.dropout_mode, c.r) == (head_init, mode, 4)
    assert (c.num_heads == 1) == (preset == "lora")
    assert c.down_projection == ("per_head" if preset == "lora_moe" else "shared")
    assert set(PRESETS) == {"lora", "hydralora", "hydralora+mt", "hydralora+init", "rlora", "lora_moe"}


def test_preset_errors_name_the_field():
    with pytest.raises(ValueError, match=r"RLoraConfig\.preset"):
        RLoraConfig.from_preset("moe-lora")
    with pytest.raises(ValueError, match=r"RLoraConfig\.head_init"):
        RLoraConfig.from_preset("rlora", head_init="zero")
    with pytest.raises(ValueError, match=r"RLoraConfig\.num_heads"):
        RLoraConfig.from_preset("lora", num_heads=3)
    with pytest.raises(ValueError, match=r"RLoraConfig\.rank\b"):
        RLoraConfig.from_preset("rlora", rank=8)
