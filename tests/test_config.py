"""Config loading: defaults < YAML file < --set, types, and errors that name the dotted key; MoSConfig
refusing bad option values by name."""
import math
import re
from pathlib import Path

import pytest

from mos.lab.cli import main
from mos.lab.data.config import DataConfig
from mos.config import MoSConfig
from mos.lab.config import ModelConfig, RunConfig, TrainConfig
from mos.layer import MoSLayer
from mos.lab.config_io import config_to_dict, dump_yaml, load_run_config
from tests.input_cases import named

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.01\n  batch_size: 64\nmodel:\n  mos:\n    num_themes: 4\n")
    cfg = load_run_config(path, ["train.batch_size=32", "model.mos.top_k=2"])
    assert cfg.train.lr == 0.01                # file beats default
    assert cfg.train.batch_size == 32          # override beats file
    assert cfg.model.mos.num_themes == 4       # file, nested
    assert cfg.model.mos.top_k == 2            # override, nested
    assert cfg.train.max_epochs == RunConfig().train.max_epochs   # untouched default
    assert load_run_config(None, []) == RunConfig()


def test_override_values_are_typed():
    cfg = load_run_config(None, ["train.seeds=[0,1,2]", "model.mos.max_theme_tokens=null", "train.lr=1",
                                 "model.mos.temperature=3e-1", "models=[mos]", "model.use_category=false"])
    assert cfg.train.seeds == (0, 1, 2)
    assert cfg.model.mos.max_theme_tokens is None
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.mos.temperature == 0.3    # PyYAML reads 3e-1 as a string; float fields take it
    assert cfg.models == ("mos",)
    assert cfg.model.use_category is False
    assert load_run_config(None, ["model.mos.max_theme_tokens=16"]).model.mos.max_theme_tokens == 16


def test_later_overrides_win_and_sections_merge(tmp_path):
    path = write(tmp_path, "model:\n  mos:\n    num_themes: 4\n")
    cfg = load_run_config(path, ["train.lr=0.1", "train.lr=0.2", "model.mos={top_k: 2}"])
    assert cfg.train.lr == 0.2
    assert (cfg.model.mos.num_themes, cfg.model.mos.top_k) == (4, 2)


def test_empty_sections_keep_defaults(tmp_path):
    assert load_run_config(write(tmp_path, ""), []) == RunConfig()
    assert load_run_config(write(tmp_path, "model:\ntrain:\n"), []) == RunConfig()


def test_yaml_round_trip_through_file(tmp_path):
    cfg = load_run_config(None, ["train.seeds=[3,4]", "model.mos.fusion=concat", "model.training=joint",
                                 "model.mos.max_theme_tokens=5"])
    dumped = dump_yaml(cfg)
    assert "seeds: [3, 4]" in dumped            # lists inline, as a person writes them
    assert config_to_dict(cfg)["train"]["seeds"] == [3, 4]   # JSON-ready: tuples become lists
    assert load_run_config(write(tmp_path, dumped), []) == cfg


@pytest.mark.parametrize("overrides,field,value", [
    (["model.mos.fusion=concat", "model.training=joint"], "mos.fusion", "concat"),
    (["model.mos.fusion=residual"], "mos.fusion", "residual"),
    (["model.ablation.vq_detach_tokens=false"], "ablation.vq_detach_tokens", False),
    (["model.ablation.router=random"], "ablation.router", "random"),
    (["model.mos.extras_detach_inputs=true"], "mos.extras_detach_inputs", True),
    (["model.training=joint"], "training", "joint"),
    (["model.recency=none"], "recency", "none"),
    (["model.item_id_dim=8"], "item_id_dim", 8),
])
def test_design_options_round_trip(tmp_path, overrides, field, value):
    """The options that keep MoS at least as good as its backbone: --set, then YAML and back."""
    cfg = load_run_config(None, overrides + ["profile.setting=long histories"])
    got = cfg.model
    for name in field.split("."):
        got = getattr(got, name)
    assert got == value and cfg.profile.setting == "long histories"
    assert load_run_config(write(tmp_path, dump_yaml(cfg)), []) == cfg


def test_design_option_defaults():
    model = RunConfig().model
    assert (model.mos.fusion, model.ablation.vq_detach_tokens, model.training) == ("residual", True, "boosted")


def test_boosted_training_needs_a_residual_fusion_over_a_global_expert():
    for override in ("model.mos.fusion=concat", "model.ablation.experts=[short,themes]",
                     "model.ablation.experts=[global]"):
        with pytest.raises(ValueError, match=r"model\.training: expected 'joint' when the MoS layer has no "
                                             r"residual fusion over a global expert and another .* got 'boosted'"):
            load_run_config(None, [override])


def test_default_config_file_loads():
    cfg = load_run_config(str(ROOT / "configs" / "default.yaml"), [])
    assert cfg.models == ("backbone", "mos")
    assert cfg.train.seeds == (0, 1, 2)


def test_unknown_key_in_file_names_dotted_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "model:\n  mos:\n    num_theme: 4\n")
    with pytest.raises(ValueError, match=r"model\.mos\.num_theme'") as err:
        load_run_config(path, [])
    assert "num_themes" in str(err.value) and path in str(err.value)
    with pytest.raises(ValueError, match=r"'trian'.*top level.*models, data, model, train"):
        load_run_config(write(tmp_path, "trian:\n  lr: 0.1\n"), [])


def test_unknown_key_in_override_names_dotted_key():
    with pytest.raises(ValueError, match=r"--set train\.bach_size=3: unknown key 'train\.bach_size'.*batch_size"):
        load_run_config(None, ["train.bach_size=3"])
    with pytest.raises(ValueError, match=r"'model\.mos\.bogus'"):
        load_run_config(None, ["model.mos={bogus: 1}"])
    with pytest.raises(ValueError, match=r"'train\.lr' is a value"):
        load_run_config(None, ["train.lr.x=1"])


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=abc", r"train\.batch_size: expected an int, got 'abc'"),
    ("train.batch_size=true", r"train\.batch_size: expected an int, got True"),
    ("train.lr=fast", r"train\.lr: expected a number, got 'fast'"),
    ("train.seeds=0", r"train\.seeds: expected a list, got 0"),
    ("model.mos.max_theme_tokens=[1]", r"model\.mos\.max_theme_tokens: expected an int or null"),
    ("model.mos=3", r"model\.mos: expected a mapping"),
])
def test_wrong_type_names_key_expected_and_given(override, expected):
    with pytest.raises(TypeError, match=expected):
        load_run_config(None, [override])


def test_post_init_checks_see_final_values_and_name_dotted_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.mos\.fusion: expected one of \['residual', 'concat'\], got 'sum'"):
        load_run_config(None, ["model.mos.fusion=sum"])
    # Valid alone in the file, invalid once the override lands: the check runs on the merged values.
    path = write(tmp_path, "model:\n  mos:\n    num_themes: 4\n")
    with pytest.raises(ValueError, match=r"model\.mos\.top_k"):
        load_run_config(path, ["model.mos.top_k=5"])
    with pytest.raises(ValueError, match=r"train\.progress"):
        load_run_config(None, ["train.progress=loud"])


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3"])
def test_malformed_override_is_named(override):
    with pytest.raises(ValueError, match=re.escape(f"--set {override!r}")):
        load_run_config(None, [override])


def test_cli_bad_override_exits_with_one_line(capsys):
    assert main(["train", "--set", "train.batch_size=abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.batch_size" in err and "'abc'" in err


def test_cli_missing_config_file_exits_with_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_cli_print_config_applies_overrides(capsys):
    assert main(["train", "--print-config", "--quiet", "--set", "model.mos.num_themes=16", "train.seeds=[1]"]) == 0
    out = capsys.readouterr().out
    assert "num_themes: 16" in out and "seeds: [1]" in out and "quiet: true" in out


def test_cli_unknown_command_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit"])
    assert exit_info.value.code == 2 and "invalid choice: 'fit'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--set KEY=VALUE" in capsys.readouterr().out


def test_unknown_model_name_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"models\[\]: expected one of \['backbone', .*'mos'.*got 'mos_typo'"):
        RunConfig(models=("backbone", "mos_typo"))
    with pytest.raises(ValueError, match=r"models\[\].*got 'nope'"):
        load_run_config(None, ["models=[nope]"])


CONFIG_CASES = {
    "num_themes_0": (dict(num_themes=0), "MoSConfig.num_themes"),
    "num_themes_negative": (dict(num_themes=-2), "MoSConfig.num_themes"),
    "top_k_above_K": (dict(num_themes=3, top_k=4), "MoSConfig.top_k"),
    "top_k_0": (dict(top_k=0), "MoSConfig.top_k"),
    "fusion_sum": (dict(fusion="sum"), "MoSConfig.fusion"),
    "encoder_lstm": (dict(encoder="lstm"), "MoSConfig.encoder"),
    "global_scope_items": (dict(global_scope="items"), "MoSConfig.global_scope"),
    "session_mode_daily": (dict(session_mode="daily"), "MoSConfig.session_mode"),
    "backend_rocm": (dict(backend="rocm"), "MoSConfig.backend"),
    "max_theme_tokens_0": (dict(max_theme_tokens=0), "MoSConfig.max_theme_tokens"),
    "session_len_0": (dict(session_len=0), "MoSConfig.session_len"),
    "temperature_0": (dict(temperature=0.0), "MoSConfig.temperature"),
    "gap_seconds_negative": (dict(gap_seconds=-1.0), "MoSConfig.gap_seconds"),
    "heads_not_dividing_dim": (dict(dim=10, num_heads=4), "MoSConfig.dim"),
    "negative_aux_weight": (dict(codebook_weight=-0.5), "MoSConfig.codebook_weight"),
    "nan_aux_weight": (dict(load_balance_weight=math.nan), "MoSConfig.load_balance_weight"),
    "fusion_gate": (dict(fusion="gate"), "MoSConfig.fusion"),
    "dropout_above_1": (dict(dropout=1.5), "MoSConfig.dropout"),
    "inf_aux_weight": (dict(commitment_weight=math.inf), "MoSConfig.commitment_weight"),
    # cos / 1e-40 is inf in fp32: the routing would be NaN.
    "temperature_tiny": (dict(temperature=1e-40), "MoSConfig.temperature"),
    # cos / inf is 0 for every theme: a uniform, degenerate routing.
    "temperature_inf": (dict(temperature=math.inf), "MoSConfig.temperature"),
    "max_theme_tokens_past_int64": (dict(max_theme_tokens=10 ** 30), "MoSConfig.max_theme_tokens"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_rejects_bad_options(case):
    """MoSConfig refuses unknown or out-of-range option values, naming the field."""
    options, name = CONFIG_CASES[case]
    with pytest.raises(ValueError, match=named(name.replace(".", r"\."))):
        MoSConfig(**options)


@pytest.mark.parametrize("options, name", [(dict(lr=math.inf), "train.lr"), (dict(seeds=(0, 1, 0)), "train.seeds")],
                         ids=["lr_inf", "seeds_repeated"])
def test_training_options_refuse_an_infinite_rate_and_a_repeated_seed(options, name):
    """A repeated seed is one run counted twice by the paired statistics."""
    with pytest.raises(ValueError, match=named(name.replace(".", r"\."))):
        TrainConfig(**options)


def _fields_of(kind):
    import typing

    from mos.lab.config import MoEConfig, ProfileConfig
    from mos.lab.data.config import LogConfig, SyntheticConfig

    prefixes = {MoSConfig: "MoSConfig", MoEConfig: "model.moe", ModelConfig: "model", TrainConfig: "train",
                ProfileConfig: "profile", DataConfig: "data", SyntheticConfig: "data.synthetic", LogConfig: "data.logs"}
    return [(cls, name, f"{prefix}.{name}") for cls, prefix in prefixes.items()
            for name, hint in typing.get_type_hints(cls).items() if hint is kind]


def _bool_fields():
    """(class, field, the name its errors use) of every bool option of every config dataclass."""
    return _fields_of(bool)


@pytest.mark.parametrize("cls, name, key", _bool_fields(), ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("value", ["False", 0, None], ids=["string", "int", "none"])
def test_every_bool_option_refuses_what_is_not_a_bool(cls, name, key, value):
    """"False" is truthy: a flag given as a string (or 0, or None) would silently mean something else."""
    with pytest.raises(TypeError, match=re.escape(f"{key}: expected True or False, got {value!r}")):
        cls(**{name: value})


def _float_fields():
    """(class, field, the name its errors use) of every float option (not Optional) of every config dataclass."""
    return _fields_of(float)


@pytest.mark.parametrize("cls, name, key", _float_fields(), ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("value", ["0.5", True, None], ids=["string", "bool", "none"])
def test_every_float_option_refuses_what_is_not_a_number(cls, name, key, value):
    """A string or None failed inside a comparison naming nothing; True passed as 1.0."""
    with pytest.raises(TypeError, match=re.escape(f"{key}: expected a number, got {value!r}")):
        cls(**{name: value})


def test_a_numpy_scalar_option_is_stored_as_a_python_float():
    import numpy as np

    config = MoSConfig(gap_seconds=np.float32(5.0), temperature=np.float64(0.2))
    assert type(config.gap_seconds) is float and config.gap_seconds == 5.0 and config.temperature == 0.2


def test_the_layer_config_is_frozen_and_replace_checks_the_copy():
    """A layer reads its config on every forward: an option changed on a live layer would bypass the checks."""
    import dataclasses

    config = MoSConfig(num_themes=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 99
    assert dataclasses.replace(config, top_k=2).top_k == 2
    with pytest.raises(ValueError, match=named("MoSConfig.top_k")):
        dataclasses.replace(config, top_k=5)


def test_the_layer_refuses_a_dict_for_its_config():
    with pytest.raises(TypeError, match=named("config") + ": expected a MoSConfig, got dict"):
        MoSLayer({"dim": 8})


ABLATION_CASES = {
    "router_kmeans": (dict(router="kmeans"), "model.ablation.router"),
    "routing_unit_item": (dict(routing_unit="item"), "model.ablation.routing_unit"),
    "expert_unknown": (dict(experts=("global", "long")), "model.ablation.experts[]"),
    "experts_empty": (dict(experts=()), "model.ablation.experts"),
    "experts_repeated": (dict(experts=("short", "short")), "model.ablation.experts"),
}


@pytest.mark.parametrize("case", ABLATION_CASES)
def test_ablation_rejects_bad_options(case):
    """The lab's ablation section refuses unknown parts, naming the key."""
    from mos.lab.config import MoSAblation
    options, name = ABLATION_CASES[case]
    with pytest.raises(ValueError, match=re.escape(name) + ":"):
        MoSAblation(**options)


@pytest.mark.parametrize("experts", [(), ("global", "long"), ("short", "short"), "global"])
def test_layer_rejects_bad_expert_sets(experts):
    """MoSLayer(experts=...) refuses an empty, unknown, repeated or non-list expert set by name."""
    with pytest.raises(ValueError, match=r"experts: expected a non-empty list of distinct kinds"):
        MoSLayer(experts=experts)


@pytest.mark.parametrize("part", ["router", "routing_unit"])
def test_layer_rejects_parts_that_are_not_callable(part):
    with pytest.raises(TypeError, match=rf"{part}: expected a callable \(see mos\.routing\), got str"):
        MoSLayer(**{part: "random"})


SECTION_CASES = {
    "ablation_none": (lambda: ModelConfig(ablation=None), r"model\.ablation: expected a MoSAblation .*got NoneType"),
    "ablation_unknown_key": (lambda: ModelConfig(ablation={"routers": "random"}),
                             r"model\.ablation: unknown option\(s\) \['routers'\]; expected some of \['router'"),
    "synthetic_none": (lambda: DataConfig(synthetic=None), r"data\.synthetic: expected a SyntheticConfig"),
    "logs_string": (lambda: DataConfig(logs="x"), r"data\.logs: expected a LogConfig .*got str 'x'"),
    "logs_unknown_key": (lambda: DataConfig(logs={"user_col": "u"}), r"data\.logs: unknown option\(s\) \['user_col'\]"),
}


@pytest.mark.parametrize("case", SECTION_CASES)
def test_config_sections_refuse_what_is_not_a_section(case):
    """A nested section given as something other than its dataclass or a dict of its fields, or
    with a key it has not, is refused at once, naming the section (not later, at first use)."""
    build, message = SECTION_CASES[case]
    with pytest.raises(TypeError, match=message):
        build()


def _int_fields():
    """(class, field, the name its errors use) of every int option of every config dataclass."""
    import typing

    from mos.config import MoSConfig
    from mos.lab.config import MoEConfig, ModelConfig, ProfileConfig, TrainConfig
    from mos.lab.data.config import DataConfig, LogConfig, SyntheticConfig

    prefixes = {MoSConfig: "MoSConfig", MoEConfig: "model.moe", ModelConfig: "model", TrainConfig: "train",
                ProfileConfig: "profile", DataConfig: "data", SyntheticConfig: "data.synthetic", LogConfig: "data.logs"}
    tuples = {ModelConfig: ("mlp_hidden",), ProfileConfig: ("lengths",),
              SyntheticConfig: ("interests_per_user", "sessions_per_user", "session_length")}
    cases = []
    for cls, prefix in prefixes.items():
        for name, hint in typing.get_type_hints(cls).items():
            if hint is int or hint == typing.Optional[int]:
                cases.append((cls, name, 2.5, f"{prefix}.{name}"))
        for name in tuples.get(cls, ()):
            cases.append((cls, name, (2, 3.5), f"{prefix}.{name}[]"))
    return cases


@pytest.mark.parametrize("cls, name, value, key", _int_fields(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_int_option_refuses_a_float_by_name(cls, name, value, key):
    """An int option given 2.5 (through the Python API, where YAML's types do not help) fails
    where the config is built, naming the field; a bool is no int either."""
    with pytest.raises(TypeError, match=re.escape(f"{key}: expected an int, got")):
        cls(**{name: value})
    if not isinstance(value, tuple):
        with pytest.raises(TypeError, match=re.escape(f"{key}: expected an int, got True (bool)")):
            cls(**{name: True})


def test_the_layer_refuses_non_integer_options_at_construction():
    from mos.layer import MoSLayer

    for option in ("session_len", "max_theme_tokens", "num_themes"):
        with pytest.raises(TypeError, match=rf"MoSConfig\.{option}: expected an int, got 2\.5 \(float\)"):
            MoSLayer(**{option: 2.5})


@pytest.mark.parametrize("override, expected", [
    ("train.weight_decay=.inf", r"^train\.weight_decay: expected a finite number, got inf"),
    ("model.moe.capacity_factor=.inf", r"^model\.moe\.capacity_factor: expected a finite number, got inf"),
    ("data.logs.rating_threshold=.nan", r"^data\.logs\.rating_threshold: expected a finite number, got nan"),
    ("data.synthetic.label_taste=1e400", r"^data\.synthetic\.label_taste: expected a finite number, got inf"),
    ("train.seeds=[0,-1]", r"^train\.seeds: expected ints in \[0, 2\^32\), got \[0, -1\]"),
    ("data.seed=4294967296", r"^data\.seed: expected an int in \[0, 2\^32\), got 4294967296"),
])
def test_options_out_of_any_useful_range_are_named(override, expected):
    """NaN and infinite options reached a loss or a size as NaN (the error then named another
    key); seeds out of the generators' range failed inside numpy or torch."""
    with pytest.raises(ValueError, match=expected):
        load_run_config(None, [override])


def test_split_fractions_must_leave_training_samples():
    with pytest.raises(ValueError, match=r"^data\.test_fraction: expected valid_fraction \+ test_fraction < 1 "
                                         r"\(training takes the rest\), got 0\.6 \+ 0\.4"):
        load_run_config(None, ["data.valid_fraction=0.6", "data.test_fraction=0.4"])


def test_a_key_repeated_in_a_config_file_is_refused(tmp_path):
    """PyYAML keeps a repeated key's last value: a second `train:` section would drop the first's
    options without a word."""
    path = write(tmp_path, "train:\n  lr: 0.1\nmodel:\n  use_category: true\ntrain:\n  max_epochs: 3\n")
    with pytest.raises(ValueError, match=r"not valid YAML \(key 'train' repeats the one on line 1 .* line 5"):
        load_run_config(path, [])
    nested = write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ValueError, match=r"key 'lr' repeats the one on line 2"):
        load_run_config(nested, [])


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    """The repeated-key check skips `<<:` (a merge, not a key)."""
    path = write(tmp_path, "train: &train {lr: 0.01, max_epochs: 2}\ndata:\n  seed: 3\n"
                           "model:\n  moe:\n    <<: {top_k: 1}\n    capacity_factor: 2.0\n")
    cfg = load_run_config(path, [])
    assert (cfg.train.lr, cfg.model.moe.top_k, cfg.model.moe.capacity_factor) == (0.01, 1, 2.0)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  out_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_run_config(str(path), [])


def test_an_output_folder_that_cannot_be_made_stops_before_the_data_loads(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert main(["train", "--set", f"train.out_dir={tmp_path / 'a_file'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mos train: error: train.out_dir: expected a folder that can be created or exists, got ")
    assert err.count("\n") == 1


def test_per_model_and_grid_options_are_checked_when_the_config_loads():
    """A misspelt or invalid per-model option failed only when the profile reached that model."""
    with pytest.raises(ValueError, match=r"^profile\.per_model\.mos: model\.mos\.nmu_themes: unknown key"):
        load_run_config("profile", ["profile.per_model={mos: {model.mos.nmu_themes: 4}}"])
    with pytest.raises(ValueError, match=r"^profile\.grid\.backbone\[1\]: model\.item_id_dim: expected a positive"):
        load_run_config("profile", ["profile.grid={backbone: [{model.item_id_dim: 8}, {model.item_id_dim: 0}]}"])


def test_a_grid_set_is_checked_over_its_model_s_per_model_options():
    """At run time a grid's set applies over the model's per_model options: a top_k above the
    default 4 experts is valid where per_model gives 8."""
    cfg = load_run_config("profile", ["profile.per_model={gshard: {model.moe.num_experts: 8}}",
                                      "profile.grid={gshard: [{model.moe.top_k: 6}]}"])
    assert cfg.profile.grid["gshard"] == [{"model.moe.top_k": 6}]


def test_a_per_model_override_merges_its_dotted_option_keys_whole():
    """`--set profile.per_model={backbone: {model.item_id_dim: 16}}` updates backbone's options:
    the dotted option name is one key, not a path to split."""
    cfg = load_run_config("profile", ["profile.per_model={backbone: {model.item_id_dim: 16}}"])
    assert cfg.profile.per_model["backbone"] == {"model.item_id_dim": 16}
    assert cfg.profile.per_model["mos"] == load_run_config("profile", []).profile.per_model["mos"]
