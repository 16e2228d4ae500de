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
from moezoo.zoo import (
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    hub,
    is_model,
    list_models,
    list_pretrained,
    register_model,
    registry,
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


# ----------------------------------------------------------------------------------------------------------
# Checked before anything is built: checkpoint_path, size (max_parameters), config.json values
# ----------------------------------------------------------------------------------------------------------


def tiny_net_parameters(dim: int, num_classes: int) -> int:
    """TinyNet's parameter count by hand: proj (dim x dim + dim), head (num_classes x dim + num_classes)."""
    return dim * dim + dim + num_classes * dim + num_classes


@pytest.fixture
def spy(dummies):
    """test_dummy_spy: a TinyNet entrypoint that records the default device of each call ("meta" for the size
    check), and builds a torch.nn.Sequential of ``depth`` Linear(1, 1) when given a depth."""
    calls = []

    @register_model
    def test_dummy_spy(pretrained: bool = False, depth: int | None = None, **kwargs) -> nn.Module:
        calls.append(torch.empty(()).device.type)
        if depth is not None:
            return nn.Sequential(*(nn.Linear(1, 1) for _ in range(depth)))
        return TinyNet(**kwargs)

    yield calls
    registry.unregister_model("test_dummy_spy")


@pytest.mark.parametrize("name", ["missing.pt", "missing.safetensors", "weights.h5"])
def test_checkpoint_path_is_checked_before_the_model_is_built(spy, tmp_path, name):
    with pytest.raises((FileNotFoundError, ValueError), match=name):
        create_model("test_dummy_spy", checkpoint_path=tmp_path / name)
    assert spy == []


def test_a_model_above_max_parameters_is_refused_before_allocation(spy):
    dim = 100_000  # 40 GB of float32 weights
    with pytest.raises(registry.ModelTooLargeError) as info:
        create_model("test_dummy_spy", dim=dim)
    expected = tiny_net_parameters(dim, 3)
    message = str(info.value)
    assert f"{expected:,} parameters ({expected * 4 / 1e9:,.1f} GB as float32)" in message
    assert "max_parameters=4,000,000,000" in message and "dim=100000" in message
    assert spy == ["meta"]  # counted on the meta device, never built for real


def test_max_parameters_is_the_largest_count_accepted(spy):
    exact = tiny_net_parameters(4, 3)
    with pytest.raises(registry.ModelTooLargeError, match=f"{exact} parameters"):
        create_model("test_dummy_spy", max_parameters=exact - 1)
    assert sum(p.numel() for p in create_model("test_dummy_spy", max_parameters=exact).parameters()) == exact
    spy.clear()
    create_model("test_dummy_spy", max_parameters=None)
    assert spy == ["cpu"]  # no size check at all


def test_under_a_meta_default_device_nothing_is_allocated_and_nothing_is_refused(spy):
    with torch.device("meta"):
        model = create_model("test_dummy_spy", dim=100_000)
    assert sum(p.numel() for p in model.parameters()) == tiny_net_parameters(100_000, 3)
    assert spy == ["meta"]  # built once, by the caller's wish, on meta


@pytest.mark.parametrize("value", [0, -1, float("inf"), "4e9", True])
def test_max_parameters_must_be_a_positive_number(dummies, value):
    with pytest.raises(ValueError, match="max_parameters must be a positive number"):
        create_model("test_dummy_plain", max_parameters=value)


def test_a_million_blocks_are_refused_by_the_part_count(spy):
    with pytest.raises(registry.ModelTooLargeError, match="more than MAX_MODEL_PARTS=20,000") as info:
        create_model("test_dummy_spy", depth=1_000_000)
    assert "depth=1000000" in str(info.value)
    assert spy == ["meta"]


def test_the_size_check_leaves_the_random_state_alone(dummies):
    torch.manual_seed(0)
    model, after = create_model("test_dummy_plain"), torch.rand(3)
    torch.manual_seed(0)
    reference, reference_after = TinyNet(), torch.rand(3)
    assert_same_weights(model, reference.state_dict())
    assert torch.equal(after, reference_after)


def test_modules_built_by_other_threads_meanwhile_are_not_counted(dummies):
    """The registration hooks are global; they count the thread that runs create_model only."""
    import threading

    elsewhere = []

    @register_model
    def test_dummy_busy_neighbour(pretrained: bool = False) -> TinyNet:
        neighbour = threading.Thread(target=lambda: elsewhere.append(nn.Linear(100, 100)))  # 10,100 parameters
        neighbour.start()
        neighbour.join()
        dim = int(torch.tensor(4).item())  # not on meta: counted while built for real, hooks on
        return TinyNet(dim)

    try:
        model = create_model("test_dummy_busy_neighbour", max_parameters=tiny_net_parameters(4, 3))
    finally:
        registry.unregister_model("test_dummy_busy_neighbour")
    assert isinstance(model, TinyNet)
    assert [layer.weight.device.type for layer in elsewhere] == ["cpu", "cpu"]  # the meta device is per thread


@pytest.fixture
def not_meta_buildable():
    """test_dummy_item: its constructor reads a tensor's value (impossible on the meta device)."""

    @register_model
    def test_dummy_item(pretrained: bool = False, dim: int = 4, linear_first: bool = True) -> nn.Module:
        first = [nn.Linear(dim, dim)] if linear_first else []
        width = int(torch.tensor(dim).item())
        return nn.Sequential(*first, nn.Linear(width, width))

    yield
    registry.unregister_model("test_dummy_item")


def test_a_model_that_cannot_be_built_on_meta_is_counted_while_it_is_built(not_meta_buildable):
    assert isinstance(create_model("test_dummy_item", dim=4), nn.Sequential)
    with pytest.raises(registry.ModelTooLargeError, match="building stopped at 110 parameters"):
        create_model("test_dummy_item", dim=10, linear_first=False, max_parameters=100)  # a 10x10 Linear: 110
    # Parameters counted on meta before the constructor failed there already pass the limit:
    with pytest.raises(registry.ModelTooLargeError, match="counted 110 parameters .* before it failed"):
        create_model("test_dummy_item", dim=10, max_parameters=100)


@pytest.mark.parametrize("model_args", [
    {"hidden_size": 1_000_000_000}, {"num_experts": 100_000_000}, {"num_classes": 10_000_000_000},
    {"depth": 1_000_000},
], ids=lambda args: next(iter(args)))
def test_the_issue_probes_in_a_config_json_are_refused_naming_the_source(tmp_path, model_args):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_dit_moe", "model_args": model_args}))
    with pytest.raises(registry.ModelTooLargeError) as info:
        create_model(f"local-dir:{tmp_path}")
    message = str(info.value)
    assert f"local-dir:{tmp_path}" in message and "GB as float32" in message
    assert f"{next(iter(model_args))}={next(iter(model_args.values()))}" in message


@pytest.mark.parametrize(("model_args", "at_fault"), [
    ({"dim": "wide", "num_classes": 3}, "dim='wide' (str)"),
    ({"dim": 6.5, "num_classes": 3}, "dim=6.5 (float)"),
    ({"dim": 4, "num_classes": 1e3}, "num_classes=1000.0 (float)"),
    ({"dim": 4, "width": 3}, "width=3 (int)"),
])
def test_config_json_values_that_do_not_build_name_the_source_and_the_field(dummies, tmp_path, model_args, at_fault):
    """TinyNet does not validate its arguments: torch's own error names no field, the registry finds it."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_dummy_plain", "model_args": model_args}))
    with pytest.raises(registry.ConfigError) as info:
        create_model(f"local-dir:{tmp_path}")
    message = str(info.value)
    assert f"local-dir:{tmp_path}" in message and str(tmp_path / "config.json") in message
    assert f"at fault: {at_fault}." in message


def test_missing_weights_of_a_local_dir_fail_before_the_real_build(spy, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_dummy_spy", "model_args": {}}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert spy == ["meta"]


# ----------------------------------------------------------------------------------------------------------
# Hostile pickles: refused, and the code in them never runs
# ----------------------------------------------------------------------------------------------------------


class _TouchesAFile:
    """Unpickling it would call os.system (what a hostile checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("loader", ["create_model", "load_checkpoint"])
def test_a_hostile_pickle_is_refused_and_its_code_does_not_run(dummies, tmp_path, suffix, writer, loader):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / f"hostile{suffix}"
    if writer == "torch.save":  # a zip archive, as torch.save writes, with real weights next to the object
        torch.save({"state_dict": seeded_state_dict(0), "hyper_parameters": _TouchesAFile(marker)}, path)
    else:  # a bare pickle (no tensors: plain pickle would pickle them through another global)
        path.write_bytes(pickle.dumps({"hyper_parameters": _TouchesAFile(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"hostile\.\w+ was refused: torch.load\(weights_only=True\)(.|\n)*\.system"):
        if loader == "create_model":
            create_model("test_dummy_plain", checkpoint_path=path)
        else:
            hub.load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:.*(TorchScript|deprecated)")
def test_a_torchscript_archive_is_refused(dummies, tmp_path):
    scripted = torch.jit.trace(TinyNet(), torch.zeros(1, 4))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(ValueError, match="TorchScript"):
        create_model("test_dummy_plain", checkpoint_path=tmp_path / "scripted.pt")


# ----------------------------------------------------------------------------------------------------------
# The module docstring's examples run
# ----------------------------------------------------------------------------------------------------------


def test_the_registry_docstring_examples_run():
    import doctest

    try:
        results = doctest.testmod(registry, verbose=False, report=False, optionflags=doctest.ELLIPSIS)
    finally:
        if is_model("tiny_mlp"):
            registry.unregister_model("tiny_mlp")
    assert results.attempted >= 8 and results.failed == 0
