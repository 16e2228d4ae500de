"""zoo.registry with tiny dummy entrypoints registered by a fixture (and removed after each test): names,
tags, wildcards, constructor arguments, and every way weights get in (bundled, checkpoint_path, local-dir:,
hf-hub:)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import moezoo
from moezoo.zoo import hub, registry
from moezoo.zoo.registry import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    is_model,
    list_models,
    list_pretrained,
    register_model,
    split_model_name_tag,
)

DUMMIES = ("test_dummy_net2", "test_dummy_net10", "test_dummy_plain", "test_dummy_foreign")


class TinyNet(nn.Module):
    def __init__(self, dim: int = 4, num_classes: int = 3):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x).relu())


def seeded_state_dict(seed: int, **model_args) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TinyNet(**model_args).state_dict()


def official_keys(state_dict: dict) -> dict:
    """How a foreign codebase names TinyNet's weights."""
    return {k.replace("proj.", "fc_in.").replace("head.", "classifier."): v for k, v in state_dict.items()}


def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """Official -> ours; our own keys pass through unchanged."""
    return {k.replace("fc_in.", "proj.").replace("classifier.", "head."): v for k, v in state_dict.items()}


def assert_same_weights(model: nn.Module, state_dict: dict) -> None:
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for key, value in state_dict.items():
        assert torch.equal(ours[key], value), key


@pytest.fixture
def dummies(tmp_path, monkeypatch):
    """Four registered dummies; net2 has two bundled checkpoints (tags "first" and "wide")."""
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(hub, "WEIGHTS_DIR", weights)
    save_file(seeded_state_dict(0), str(weights / "first.safetensors"))
    save_file(seeded_state_dict(1, dim=6, num_classes=5), str(weights / "wide.safetensors"))
    cfgs = {
        "first": PretrainedCfg(file="first.safetensors", sha256=hub.sha256_file(weights / "first.safetensors"),
                               metadata={"label_names": ["a", "b", "c"]}),
        "wide": PretrainedCfg(file="wide.safetensors", model_args={"dim": 6, "num_classes": 5}),
    }

    @register_model(pretrained_cfgs=cfgs)
    def test_dummy_net2(pretrained: bool = False, **kwargs) -> TinyNet:
        return TinyNet(**kwargs)

    @register_model(pretrained_cfgs={"x": PretrainedCfg(hf_hub_id="org/net10")})
    def test_dummy_net10(pretrained: bool = False, **kwargs) -> TinyNet:
        return TinyNet(**kwargs)

    @register_model
    def test_dummy_plain(pretrained: bool = False, **kwargs) -> TinyNet:
        return TinyNet(**kwargs)

    @register_model(checkpoint_filter=checkpoint_filter)
    def test_dummy_foreign(pretrained: bool = False, **kwargs) -> TinyNet:
        return TinyNet(**kwargs)

    yield {"net2": test_dummy_net2}
    for name in DUMMIES:
        registry.unregister_model(name)
    assert list_models("test_dummy_*") == []


# ----------------------------------------------------------------------------------------------------------
# Names, tags, lists
# ----------------------------------------------------------------------------------------------------------


def test_list_models_wildcards_natural_order_and_excludes(dummies):
    assert list_models("test_dummy_*") == ["test_dummy_foreign", "test_dummy_net2", "test_dummy_net10",
                                           "test_dummy_plain"]
    assert list_models(["test_dummy_net*", "*_plain"], exclude_filters="*10") == ["test_dummy_net2",
                                                                                  "test_dummy_plain"]
    assert list_models("TEST_DUMMY_P*") == ["test_dummy_plain"]


def test_list_pretrained_gives_arch_dot_tag(dummies):
    assert list_models("test_dummy_*", pretrained=True) == ["test_dummy_net2.first", "test_dummy_net2.wide",
                                                            "test_dummy_net10.x"]
    assert list_pretrained("test_dummy_net2") == ["test_dummy_net2.first", "test_dummy_net2.wide"]
    assert list_pretrained("*.wide") == ["test_dummy_net2.wide"]
    assert list_models("test_dummy_*", pretrained=True, exclude_filters="*.wide") == ["test_dummy_net2.first",
                                                                                      "test_dummy_net10.x"]


def test_is_model_and_split(dummies):
    assert split_model_name_tag("a.b.c") == ("a", "b.c") and split_model_name_tag("a") == ("a", "")
    assert is_model("test_dummy_net2") and is_model("test_dummy_net2.wide")
    assert not is_model("test_dummy_net2.nope") and not is_model("test_dummy_nope")


def test_default_tag_is_the_first(dummies):
    assert get_pretrained_cfg("test_dummy_net2").file == "first.safetensors"
    model = create_model("test_dummy_net2", pretrained=True)
    assert_same_weights(model, seeded_state_dict(0))
    assert model.pretrained_cfg.metadata["label_names"] == ["a", "b", "c"]


def test_tag_selects_weights_and_model_args(dummies):
    model = create_model("test_dummy_net2.wide", pretrained=True)
    assert (model.dim, model.num_classes) == (6, 5)
    assert_same_weights(model, seeded_state_dict(1, dim=6, num_classes=5))


def test_tag_without_pretrained_builds_that_architecture_only(dummies):
    model = create_model("test_dummy_net2.wide")
    assert model.num_classes == 5 and model.pretrained_cfg is get_pretrained_cfg("test_dummy_net2.wide")
    plain = create_model("test_dummy_net2")
    assert plain.num_classes == 3 and plain.pretrained_cfg is None


def test_unknown_name_suggests_close_matches(dummies):
    with pytest.raises(ValueError, match="Unknown model 'test_dummy_nte2'") as info:
        create_model("test_dummy_nte2")
    assert "test_dummy_net2" in str(info.value) and "list_models" in str(info.value)


def test_unknown_tag_lists_the_tags(dummies):
    with pytest.raises(ValueError, match="Unknown pretrained tag 'nope'.*first, wide"):
        create_model("test_dummy_net2.nope", pretrained=True)


def test_pretrained_without_cfgs_is_an_error(dummies):
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_model("test_dummy_plain", pretrained=True)


@pytest.mark.parametrize("name", ["org/repo", "C:\\models\\x", "./export", "s3:bucket"])
def test_path_like_names_suggest_both_prefixes(dummies, name):
    with pytest.raises(ValueError, match="hf-hub:") as info:
        create_model(name)
    assert "local-dir:" in str(info.value)


def test_cfg_without_a_source_is_refused_at_registration():
    with pytest.raises(ValueError, match="names no weights"):
        register_model(pretrained_cfgs={"t": PretrainedCfg(metadata={"x": 1})})(lambda pretrained=False: None)
    with pytest.raises(ValueError, match="64 hex"):
        PretrainedCfg(url="http://x/y.safetensors", sha256="abc")
    assert PretrainedCfg(url="http://x/y.safetensors", sha256="AB" * 32).sha256 == "ab" * 32


# ----------------------------------------------------------------------------------------------------------
# Constructor arguments
# ----------------------------------------------------------------------------------------------------------


def test_none_kwargs_are_dropped(dummies):
    model = create_model("test_dummy_plain", dim=None, num_classes=None)
    assert (model.dim, model.num_classes) == (4, 3)


def test_overrides_beat_model_args(dummies):
    model = create_model("test_dummy_net2.wide", num_classes=7)
    assert (model.dim, model.num_classes) == (6, 7)


def test_overrides_that_break_the_weights_are_reported(dummies):
    with pytest.raises(RuntimeError, match=r"head.weight \(checkpoint \(5, 6\), model \(7, 6\)\)") as info:
        create_model("test_dummy_net2.wide", pretrained=True, num_classes=7)
    assert "num_classes=7" in str(info.value)


def test_entrypoint_called_directly_loads_weights(dummies):
    model = dummies["net2"](pretrained=True)
    assert_same_weights(model, seeded_state_dict(0))
    assert isinstance(dummies["net2"](dim=5), TinyNet)


# ----------------------------------------------------------------------------------------------------------
# checkpoint_path
# ----------------------------------------------------------------------------------------------------------


def test_checkpoint_path_safetensors(dummies, tmp_path):
    state_dict = seeded_state_dict(2)
    save_file(state_dict, str(tmp_path / "mine.safetensors"))
    assert_same_weights(create_model("test_dummy_plain", checkpoint_path=tmp_path / "mine.safetensors"), state_dict)


def test_checkpoint_path_foreign_pickle_through_the_filter(dummies, tmp_path, caplog):
    model_sd, ema_sd = seeded_state_dict(3), seeded_state_dict(4)
    torch.save({"model": official_keys(model_sd), "ema": official_keys(ema_sd), "step": 10}, tmp_path / "train.pt")
    assert_same_weights(create_model("test_dummy_foreign", checkpoint_path=tmp_path / "train.pt"), model_sd)
    assert "checkpoint_key='ema'" in caplog.text
    model = create_model("test_dummy_foreign", checkpoint_path=tmp_path / "train.pt", checkpoint_key="ema")
    assert_same_weights(model, ema_sd)


def test_checkpoint_path_strips_wrapper_prefixes(dummies, tmp_path):
    state_dict = seeded_state_dict(5)
    torch.save({"state_dict": {f"model.module.{k}": v for k, v in state_dict.items()}}, tmp_path / "run.ckpt")
    assert_same_weights(create_model("test_dummy_plain", checkpoint_path=tmp_path / "run.ckpt"), state_dict)


def test_key_mismatch_lists_missing_and_unexpected_keys(dummies, tmp_path):
    state_dict = seeded_state_dict(6)
    state_dict["extra.weight"] = state_dict.pop("head.bias")
    torch.save(state_dict, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError) as info:
        create_model("test_dummy_plain", checkpoint_path=tmp_path / "bad.pth")
    message = str(info.value)
    assert "bad.pth" in message and "test_dummy_plain" in message
    assert "1 missing key: head.bias" in message and "1 unexpected key: extra.weight" in message


# ----------------------------------------------------------------------------------------------------------
# local-dir: and hf-hub:
# ----------------------------------------------------------------------------------------------------------


def test_local_dir_round_trip(dummies, tmp_path):
    trained = create_model("test_dummy_net2", dim=6, num_classes=2)
    out = hub.save_pretrained(trained, tmp_path / "export", "test_dummy_net2", {"dim": 6, "num_classes": 2},
                              metadata={"label_names": ["cat", "dog"]})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = create_model(f"local-dir:{out}", pretrained=True)
    assert_same_weights(model, trained.state_dict())
    assert model.pretrained_cfg.metadata == {"label_names": ["cat", "dog"]}
    assert create_model(f"local-dir:{out}", num_classes=9).num_classes == 9  # architecture only, overridden


def test_local_dir_errors(dummies, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_dummy_nte2"}))
    with pytest.raises(ValueError, match="test_dummy_net2"):
        create_model(f"local-dir:{tmp_path}")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid config.json"):
        create_model(f"local-dir:{tmp_path}")


def test_hf_hub_reads_config_and_weights_through_hf_hub_download(dummies, tmp_path, fake_hub):
    repo = tmp_path / "repo"
    trained = create_model("test_dummy_plain", num_classes=4)
    hub.save_pretrained(trained, repo, "test_dummy_plain", {"num_classes": 4}, metadata={"license": "mit"})
    for name in ("config.json", "model.safetensors"):
        fake_hub.serve_hub_file("org/tiny", "v2", name, (repo / name).read_bytes())
    model = create_model("hf-hub:org/tiny@v2", pretrained=True, cache_dir=tmp_path / "cache", progress=False)
    assert_same_weights(model, trained.state_dict())
    assert fake_hub.paths_requested("GET", "/org/") == ["/org/tiny/resolve/v2/config.json",
                                                        "/org/tiny/resolve/v2/model.safetensors"]
    agents = [agent for _, path, agent in fake_hub.requests if path.startswith("/org/")]
    assert agents and all(f"moezoo/{moezoo.__version__}" in agent for agent in agents)
    assert (tmp_path / "cache" / "models--org--tiny").is_dir()
    cfg = model.pretrained_cfg
    assert (cfg.hf_hub_id, cfg.revision, cfg.metadata, cfg.model_args) == ("org/tiny", "v2", {"license": "mit"},
                                                                           {"num_classes": 4})
