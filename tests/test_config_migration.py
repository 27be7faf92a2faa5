"""Options that moved, were added or were removed since a config or checkpoint was written: an
old key is refused naming its new place, and an old checkpoint's tree loads as it meant."""
import copy

import pytest

from mos.lab.config import RunConfig
from mos.lab.config_io import config_to_dict, load_run_config
from mos.lab.moved_options import drop_later_options


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_moved_keys_name_where_they_moved(tmp_path):
    """A key of an earlier layout is refused, naming its new place: in a file, in --set, as a keyword."""
    with pytest.raises(ValueError, match=r"'data\.num_users' moved to 'data\.synthetic\.num_users'"):
        load_run_config(write(tmp_path, "data:\n  num_users: 40\n"), [])
    with pytest.raises(ValueError, match=r"--set data\.user_column=uid: 'data\.user_column' moved to "
                                         r"'data\.logs\.user_column'"):
        load_run_config(None, ["data.user_column=uid"])
    with pytest.raises(ValueError, match=r"'data\.noise' moved to 'data\.synthetic\.noise'"):
        load_run_config(None, ["data={noise: 0.2}"])
    with pytest.raises(ValueError, match=r"'model\.mos\.router' moved to 'model\.ablation\.router'"):
        load_run_config(write(tmp_path, "model:\n  mos:\n    router: random\n"), [])
    with pytest.raises(ValueError, match=r"'model\.mos\.experts' moved to 'model\.ablation\.experts'"):
        load_run_config(None, ["model.mos.experts=[global]"])
    with pytest.raises(ValueError, match=r"'model\.mos\.ablation\.router' moved to 'model\.ablation\.router'"):
        load_run_config(None, ["model.mos.ablation.router=random"])
    with pytest.raises(ValueError, match=r"'model\.mos\.ablation\.extras_detach_inputs' moved to "
                                         r"'model\.mos\.extras_detach_inputs'"):
        load_run_config(write(tmp_path, "model:\n  mos:\n    ablation:\n      extras_detach_inputs: true\n"), [])
    from mos.lab.data.config import DataConfig
    from mos.config import MoSConfig
    from mos.layer import MoSLayer
    with pytest.raises(TypeError, match=r"DataConfig\.num_items: moved to data\.synthetic\.num_items"):
        DataConfig(num_items=5)
    with pytest.raises(TypeError, match=r"MoSConfig\.vq_detach_tokens: moved out of the config; it is an option "
                                        r"of the router: MoSLayer\(config, router=mos\.routing\.LearnedRouter"):
        MoSLayer(vq_detach_tokens=False)
    with pytest.raises(TypeError, match=r"MoSConfig\.ablation: moved out of the config; it is the options it held"):
        MoSConfig(ablation={"router": "random"})
    with pytest.raises(ValueError, match=r"'model\.mos\.capacity' moved to 'model\.mos\.max_theme_tokens'"):
        load_run_config(None, ["model.mos.capacity=8"])
    with pytest.raises(TypeError, match=r"MoSConfig\.capacity: renamed max_theme_tokens"):
        MoSConfig(capacity=8)
    with pytest.raises(ValueError, match=r"'model\.mos_training' moved to 'model\.training'"):
        load_run_config(None, ["model.mos_training=joint"])
    from mos.lab.config import ModelConfig
    with pytest.raises(TypeError, match=r"ModelConfig\.mos_training: renamed training \(model\.training\)"):
        ModelConfig(mos_training="joint")


def test_a_checkpoint_tree_of_an_earlier_layout_still_loads():
    """Checkpoints keep the configuration tree they were written with: its moved keys move."""
    old = config_to_dict(RunConfig())
    data = old["data"]
    data.update(data.pop("synthetic"), **data.pop("logs"))
    for added in ("category_group", "taste_drift", "label_taste_from", "label_item"):   # newer than that layout
        del data[added]
    data["num_users"], data["user_column"] = 40, "uid"
    drop_later_options(old)
    old["model"]["mos"].update(old["model"].pop("ablation"), router="random")
    old["model"]["mos"]["capacity"] = 5
    del old["model"]["mos"]["max_theme_tokens"]
    old["model"]["mos_training"] = old["model"].pop("training")
    del old["model"]["recency"], old["model"]["item_id_dim"]
    cfg = load_run_config(None, [], base=old)
    assert (cfg.data.synthetic.num_users, cfg.data.logs.user_column) == (40, "uid")
    # Options added since take the value that gives the model of the time: no recency embedding.
    assert (cfg.model.training, cfg.model.recency, cfg.model.item_id_dim) == ("boosted", "none", None)
    assert (cfg.model.ablation.router, cfg.model.mos.max_theme_tokens) == ("random", 5)
    assert load_run_config(None, [], base=config_to_dict(cfg)) == cfg


def test_options_added_at_their_default_are_the_defaults():
    """A checkpoint's tree without an option added since gets that option's default, which must
    be the dataclass default (the one that reproduces the behaviour of before)."""
    from mos.lab.moved_options import ADDED_AT_DEFAULT
    tree = config_to_dict(RunConfig())
    for key, value in ADDED_AT_DEFAULT.items():
        node = tree
        for name in key.split("."):
            node = node[name]
        assert node == value, key


def _tree_of_the_layout_before_the_layer_parts(readout="target"):
    """A run's config tree as the code before the layer took its ablations as parts wrote it:
    the ablation options and extras_detach_inputs under model.mos.ablation, a readout option,
    none of the options added since."""
    tree = config_to_dict(RunConfig())
    drop_later_options(tree)
    model, mos = tree["model"], tree["model"]["mos"]
    mos["ablation"] = {**model.pop("ablation"), "extras_detach_inputs": mos.pop("extras_detach_inputs")}
    mos["readout"] = readout
    for added in ("theme_mass", "attention_mass"):
        del mos[added]
    for added in ("category_group", "taste_drift", "label_taste_from", "label_item"):
        del tree["data"]["synthetic"][added]
    return tree


def test_a_checkpoint_tree_of_the_layout_before_the_layer_parts_loads():
    """Such a tree loads as today's defaults; one written with a readout that is gone is refused
    naming it and why."""
    assert load_run_config(None, [], base=_tree_of_the_layout_before_the_layer_parts()) == RunConfig()
    with pytest.raises(ValueError, match=r"'model\.mos\.readout' was removed: the transformer encoder always reads "
                                         r"out by target attention"):
        load_run_config(None, [], base=_tree_of_the_layout_before_the_layer_parts(readout="last"))
    with pytest.raises(ValueError, match=r"'model\.mos\.readout' was removed"):
        load_run_config(None, ["model.mos.readout=target"])


def test_drop_later_options_removes_every_one_or_only_those_at_their_default():
    from mos.lab.moved_options import LATER_AT_DEFAULT
    tree = config_to_dict(RunConfig())
    tree["model"]["mos"]["consistency_weight"] = 0.5            # one option away from its default
    kept = drop_later_options(copy.deepcopy(tree), only_at_default=True)
    assert kept["model"]["mos"]["consistency_weight"] == 0.5
    assert "routing_embedding" not in kept["model"]
    assert "session_consistency" not in kept["model"]["ablation"]
    dropped = drop_later_options(tree)
    assert "consistency_weight" not in dropped["model"]["mos"]
    assert dropped is tree
    assert all(_absent(tree, key) for key in LATER_AT_DEFAULT)
    assert drop_later_options({"data": {}}) == {"data": {}}      # a tree without the options


def _absent(tree: dict, key: str) -> bool:
    *path, leaf = key.split(".")
    for name in path:
        tree = tree[name]
    return leaf not in tree
