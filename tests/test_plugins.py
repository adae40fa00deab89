"""Plugins: a user's own method, backbone and dataset from the command line (the examples/
files, end to end), and a pretrained backbone start (model.weights)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny_dict

from cilkit.settings import registry
from cilkit.cli import main
from cilkit.training.engine import Engine
from cilkit.models import build_backbone
from cilkit.settings.plugins import module_name

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def registries():
    """Restore every registry after a test that imports throwaway plugins."""
    tables = [registry.METHODS, registry.SOURCES, registry.SOURCE_DESCRIPTIONS, registry.SOURCE_OPTIONS,
              registry.BACKBONES, registry.BACKBONE_DESCRIPTIONS]
    saved = [dict(t) for t in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


def tiny_yaml(tmp_path, folder="", **changes):
    """tiny_config's settings (one thread) as a YAML file; returns its path."""
    data = tiny_dict(tmp_path) | {"threads": 1} | changes
    path = tmp_path / folder / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_plugin_method_runs_is_recorded_listed_and_reimported_on_resume(tmp_path, capsys):
    plugin = str(EXAMPLES / "my_method.py")
    args = ["run", str(tiny_yaml(tmp_path)), "--plugin", plugin, "--set", "method=smooth_finetune",
            "--set", "smooth_finetune.smoothing=0.2", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    res = results(tmp_path / "r")
    assert res["complete"] and res["method"] == "smooth_finetune" and res["states"][0]["top1"] > 50  # learned: 4 classes, chance is 25
    recorded = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert recorded["plugins"] == [plugin] and recorded["smooth_finetune"] == {"smoothing": 0.2}

    capsys.readouterr()
    assert main(["info", "--plugin", plugin]) == 0
    assert "smooth_finetune" in capsys.readouterr().out
    assert main(["info", "smooth_finetune", "--plugin", plugin]) == 0
    assert "label smoothing" in (out := capsys.readouterr().out) and "smooth_finetune.smoothing (float, default 0.1):" in out

    # a new process knows nothing of the plugin: --resume imports it from config.yaml
    del registry.METHODS["smooth_finetune"], sys.modules[module_name(plugin)]
    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    assert "smooth_finetune" in registry.METHODS


@pytest.mark.slow
def test_plugin_backbone_runs_and_is_listed(tmp_path, capsys):
    plugin = str(EXAMPLES / "my_backbone.py")
    args = ["run", str(tiny_yaml(tmp_path)), "--plugin", plugin, "--set", "model.backbone=mlp",
            "--set", "model.width=32", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    res = results(tmp_path / "r")
    assert res["complete"] and res["states"][0]["top1"] > 50  # learned: 4 classes, chance is 25
    assert main(["info", "--plugin", plugin]) == 0
    assert "two-layer perceptron" in capsys.readouterr().out


def _write_digits_npz(path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    y = digits.target
    np.savez(path, x_train=x[::2], y_train=y[::2], x_test=x[1::2], y_test=y[1::2])


@pytest.mark.slow
def test_plugin_dataset_from_the_config_with_its_own_option(tmp_path, capsys):
    _write_digits_npz(tmp_path / "digits.npz")
    relative = os.path.relpath(EXAMPLES / "my_dataset.py", tmp_path / "cfg")  # from the config's folder
    cfg = tiny_yaml(tmp_path, "cfg", plugins=[relative], data={"name": "npz", "options": {"file": "digits.npz"}})
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 0
    res = results(tmp_path / "r")
    assert res["complete"] and res["dataset"] == "npz" and res["states"][0]["top1"] > 50  # learned: 4 classes, chance is 25
    recorded = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert recorded["plugins"] == [str(EXAMPLES / "my_dataset.py")]
    assert recorded["data"]["options"] == {"file": "digits.npz"}

    capsys.readouterr()
    for override, expected in [("data.options.nope=1", "unknown key 'data.options.nope'"),
                               ("data.options={}", "missing key 'data.options.file'"),
                               ("data.options.file=absent.npz", "config key 'data.options.file': cannot read"),
                               ("data.name=digits", "config key 'data.options': dataset 'digits' takes no options")]:
        assert main(["run", str(cfg), "--set", override, "--out", str(tmp_path / "bad")]) == 2, override
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "bad").exists()


def test_a_broken_plugin_is_one_line_naming_it(tmp_path, capsys, registries):
    cfg = str(tiny_yaml(tmp_path))
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('no GPU here')\n")
    twice = tmp_path / "twice.py"
    twice.write_text("from cilkit.methods.finetune import Finetune\nfrom cilkit.settings.registry import register_method\n"
                     "register_method('finetune')(type('Again', (Finetune,), {}))\n")
    factory = tmp_path / "factory.py"
    factory.write_text("from cilkit.settings.registry import register_backbone\n"
                       "register_backbone('odd', 'no in_channels')(lambda size: None)\n")
    cases = [("missing.py", f"plugin '{tmp_path / 'missing.py'}': file not found"),
             ("no_such_module_xyz", "plugin 'no_such_module_xyz' failed to import (ModuleNotFoundError"),
             (str(raising), f"plugin '{raising}' failed to import (RuntimeError: no GPU here)"),
             (str(twice), "(ValueError: method 'finetune' is registered twice)"),
             (str(factory), "must take in_channels (missing in_channels)")]
    for plugin, expected in cases:
        assert main(["run", cfg, "--plugin", plugin, "--out", str(tmp_path / "r")]) == 2, plugin
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- model.weights


def _save_convnet_weights(path, seed, width=8):
    torch.manual_seed(seed)
    net = build_backbone("convnet", in_channels=1, image_size=8, width=width)
    torch.save(net.state_dict(), path)
    return net.state_dict()


@pytest.mark.slow
def test_weights_start_the_backbone_and_key_the_state0_cache(tmp_path, capsys, monkeypatch):
    starts = []
    fit = Engine.fit

    def spy(self, ctx, *args, **kwargs):
        starts.append({k: v.clone() for k, v in ctx.model.backbone.state_dict().items()})
        return fit(self, ctx, *args, **kwargs)

    monkeypatch.setattr(Engine, "fit", spy)
    weights = tmp_path / "w.pt"
    args = ["run", str(tiny_yaml(tmp_path)), "--set", "scenario.states=1", "--set", "model.weights=w.pt"]

    def run(out):
        starts.clear()
        assert main([*args, "--out", str(tmp_path / out)]) == 0
        return results(tmp_path / out)["states"][0]["state0_cached"]

    saved = _save_convnet_weights(weights, seed=11)
    assert run("a") is False
    assert starts and all(torch.equal(starts[0][k], v) for k, v in saved.items())  # state 1 began from the file
    recorded = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert recorded["model"]["weights"] == str(weights)
    assert run("b") is True and not starts  # same file: the cached state-0 model
    saved = _save_convnet_weights(weights, seed=12)
    os.utime(weights, ns=(1, 10**18))  # a rewritten file, whatever the clock's resolution
    assert run("c") is False  # a miss: trained again, from the new weights
    assert all(torch.equal(starts[0][k], v) for k, v in saved.items())

    capsys.readouterr()
    _save_convnet_weights(weights, seed=11, width=16)
    assert main([*args, "--out", str(tmp_path / "d")]) == 2
    line = one_error_line(capsys)
    assert "config key 'model.weights'" in line and str(weights) in line
    assert "'body.0.weight' has shape [16, 1, 3, 3] in the file but [8, 1, 3, 3]" in line
    weights.write_bytes(b"not a checkpoint")
    assert main([*args, "--out", str(tmp_path / "d")]) == 2
    assert "config key 'model.weights'" in (line := one_error_line(capsys)) and "cannot be read" in line
    assert main([*args[:-1], "model.weights=absent.pt", "--out", str(tmp_path / "d")]) == 2
    assert "file not found" in one_error_line(capsys)
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_a_backbone_without_last_relu_serves_every_method_but_those_that_drop_it(tmp_path, capsys, registries):
    """The backbone contract is in_channels alone; LUCIR's cosine classifier asks for features
    without the last ReLU, which a factory without ``last_relu`` cannot give: one line."""
    plugin = tmp_path / "plain.py"
    plugin.write_text("import torch\nfrom cilkit.settings.registry import register_backbone\n"
                      "class Flat(torch.nn.Module):\n"
                      "    def __init__(self, c):\n        super().__init__()\n        self.out_dim = 8\n"
                      "        self.fc = torch.nn.Linear(c * 64, 8)\n"
                      "    def forward(self, x):\n        return torch.relu(self.fc(x.flatten(1)))\n"
                      "@register_backbone('plain', 'in_channels only')\n"
                      "def plain(in_channels):\n    return Flat(in_channels)\n")
    cfg = str(tiny_yaml(tmp_path))
    common = ["--plugin", str(plugin), "--set", "model.backbone=plain", "--set", "scenario.states=2"]
    assert main(["run", cfg, *common, "--out", str(tmp_path / "ft")]) == 0
    capsys.readouterr()
    assert main(["run", cfg, *common, "--set", "method=lucir", "--out", str(tmp_path / "lucir")]) == 2
    assert "backbone 'plain' cannot drop its last ReLU" in one_error_line(capsys)


def test_a_plugin_backbone_or_reader_that_raises_when_called_is_one_line(tmp_path, capsys, registries):
    plugin = tmp_path / "raising.py"
    plugin.write_text(
        "from cilkit.settings.registry import register_backbone, register_source\n"
        "@register_backbone('odd', 'raises')\n"
        "def odd(in_channels, last_relu, width):\n"
        "    raise ValueError('width must be odd')\n"
        "@register_source('nowhere', 'raises')\n"
        "def nowhere(cfg):\n"
        "    raise FileNotFoundError('/data/nowhere.npz')\n"
    )
    cfg = tiny_yaml(tmp_path)
    assert main(["run", str(cfg), "--plugin", str(plugin), "--set", "model.backbone=odd", "--out", str(tmp_path / "a")]) == 2
    assert one_error_line(capsys) == ("error: config key 'model.backbone': backbone 'odd' failed "
                                      "(ValueError: width must be odd)")
    assert main(["run", str(cfg), "--plugin", str(plugin), "--set", "data.name=nowhere", "--out", str(tmp_path / "b")]) == 2
    assert one_error_line(capsys) == ("error: config key 'data.name': dataset 'nowhere' failed "
                                      "(FileNotFoundError: /data/nowhere.npz)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
