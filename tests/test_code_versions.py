"""The code that ran (issue 37 items 2, 3 and 12): the state-0 cache keyed on a plugin's helper
modules, a resume under other code said (or refused with ``--strict``) and recorded, and a
plugin that raises told in one line with its traceback in run.log.

Cases:
- item 2: a plugin package (``--plugin pkg.plugin``) or a plugin file importing a module beside
  it: the helper's constant edited -> the next run trains state 0 again (the same code: reused);
- item 3: a run cut after state 1, the plugin file edited -> ``--resume --strict`` is one line
  naming the plugin (exit 2, nothing run); ``--resume`` warns in one line naming the plugin (or
  the cilkit package) and goes on; results.json lists each code version with its states;
  ``--strict`` without ``--resume`` is one line;
- item 12: a plugin method's ``loss()`` raising ValueError -> one line naming the hook, the
  plugin's file and line, run.log and the resume command; run.log holds the traceback; the
  finished state is kept; a plugin calling ``sys.exit`` on import -> one line naming it (exit 2);
  an exception raised in cilkit's own code (called by a plugin) stays a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config, tiny_dict

from cilkit.cli import main
from cilkit.run import state0cache
from cilkit.run.loop import Run
from cilkit.settings import registry

REUSED = "reusing the cached state-0 model"

METHOD = '''import torch.nn.functional as F
from cilkit.methods.base import Method
from cilkit.settings.registry import register_method
{imports}

@register_method("{name}")
class Scaled(Method):
    def loss(self, ctx, batch, out):
{body}
'''
SCALED = '        return {"ce": SCALE * F.cross_entropy(out["logits"], batch.y)}'


@pytest.fixture
def registries(tmp_path):
    """Restore the registries, and forget the modules a test imported from its tmp_path."""
    tables = [registry.METHODS, registry.SOURCES, registry.BACKBONES]
    saved = [dict(t) for t in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def scaled_plugin(tmp_path: Path, monkeypatch, form: str) -> tuple[str, Path, str]:
    """A method whose loss is ``SCALE * cross-entropy``, SCALE (1.0) read from a helper module:
    ``package``: the module plugin ``<pkg>.plugin`` importing ``<pkg>.helper``; ``file``: the
    plugin file ``plugin_<x>.py`` importing the module ``helper_<x>`` beside it. Returns the
    plugin as given, the helper's file and the method's name."""
    lib = tmp_path / "lib"
    name = f"scaled_{form}_{tmp_path.name}".replace("-", "_")
    if form == "package":
        pkg = lib / f"pkg_{name}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        helper = pkg / "helper.py"
        plugin = pkg / "plugin.py"
        imports, spec = f"from pkg_{name}.helper import SCALE", f"pkg_{name}.plugin"
    else:
        lib.mkdir()
        helper = lib / f"helper_{name}.py"
        plugin = lib / f"plugin_{name}.py"
        imports, spec = f"from helper_{name} import SCALE", str(plugin)
    helper.write_text("SCALE = 1.0\n")
    plugin.write_text(METHOD.format(imports=imports, name=name, body=SCALED))
    monkeypatch.syspath_prepend(str(lib))
    return spec, helper, name


@pytest.mark.parametrize("form", ["package", "file"])
def test_an_edited_helper_module_of_a_plugin_is_a_state0_cache_miss(tmp_path, monkeypatch, capsys, registries, form):
    """issue 37 item 2: the state-0 cache is keyed on the modules a plugin imports from its
    package (or from beside its file), not on the plugin's own file alone."""
    spec, helper, name = scaled_plugin(tmp_path, monkeypatch, form)
    config = tiny_config(tmp_path, "threads=1", "train.epochs=1", "scenario.states=1", f"method={name}",
                         plugins=[spec])

    def reused(out: str) -> bool:
        capsys.readouterr()
        Run(config, tmp_path / out, progress=False).execute()
        return REUSED in capsys.readouterr().out

    assert not reused("a")
    assert reused("b")  # the same code: the entry is used
    helper.write_text("SCALE = 3.0\n")
    assert not reused("c")  # the helper's constant changed: state 0 trains again


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _code_warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if "warning" in line and "code" in line]


def test_a_resume_under_other_code_warns_refuses_with_strict_and_records_both_versions(tmp_path, capsys,
                                                                                      monkeypatch, registries):
    """issue 37 item 3: every checkpoint holds the code's digest; a resume under an edited plugin
    (or cilkit package) warns in one line naming it, ``--strict`` refuses in one line (exit 2),
    and results.json's provenance lists each code version with the states it produced."""
    name = f"edited_{tmp_path.name}".replace("-", "_")
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(METHOD.format(imports="SCALE = 1.0", name=name, body=SCALED))
    config = tiny_config(tmp_path, "threads=1", "train.epochs=1", f"method={name}", "state0_cache=null",
                         plugins=[str(plugin)])
    run_dir = tmp_path / "run"
    Run(config, run_dir, progress=False).execute(until_state=0)  # "stopped" after state 1

    capsys.readouterr()
    monkeypatch.setattr(state0cache, "package_digest", lambda: "an-edited-cilkit")  # cilkit edited
    assert main(["run", "--resume", str(run_dir), "--strict"]) == 2
    line = _one_error_line(capsys)
    assert "cilkit package" in line and str(plugin) not in line
    assert len(_results(run_dir)["states"]) == 1  # nothing ran
    Run(config, run_dir, progress=False).execute(resume=True, until_state=1)
    (warning,) = _code_warnings(capsys.readouterr().out)
    assert "cilkit package" in warning and str(plugin) not in warning

    plugin.write_text(plugin.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))  # the plugin edited
    assert main(["run", "--resume", str(run_dir), "--strict"]) == 2
    line = _one_error_line(capsys)
    assert f"plugin '{plugin}'" in line and "cilkit package" not in line
    Run(config, run_dir, progress=False).execute(resume=True)
    (warning,) = _code_warnings(capsys.readouterr().out)
    assert f"plugin '{plugin}'" in warning and "cilkit package" not in warning

    results = _results(run_dir)
    assert results["complete"]
    versions = results["provenance"]["code"]
    assert [v["states"] for v in versions] == [[0], [1], [2]]
    assert versions[0]["cilkit"] != versions[1]["cilkit"] == versions[2]["cilkit"] == "an-edited-cilkit"
    digests = [v["plugins"][str(plugin)] for v in versions]
    assert digests[0] == digests[1] != digests[2]


def test_strict_without_resume_is_one_line(tmp_path, capsys):
    """issue 37 item 3: ``--strict`` checks a resume; alone it is refused."""
    capsys.readouterr()
    assert main(["run", "--strict", "--out", str(tmp_path / "x")]) == 2
    assert "--strict" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def _cli_run(tmp_path: Path, plugin: Path, name: str, out: Path) -> int:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(tmp_path) | {"threads": 1, "state0_cache": None}))
    return main(["run", str(config), "--plugin", str(plugin), "--set", f"method={name}", "--set", "train.epochs=1",
                 "--out", str(out)])


def test_a_plugin_hook_that_raises_is_one_line_with_its_traceback_in_run_log(tmp_path, capsys, registries):
    """issue 37 item 12: a plugin method whose ``loss()`` raises (in state 2): one line naming the
    method, the hook, the plugin's file and line, run.log and the resume command (exit 2); run.log
    holds the plugin's traceback; state 1 stays saved."""
    name = f"boom_{tmp_path.name}".replace("-", "_")
    plugin = tmp_path / f"{name}.py"
    body = ('        if ctx.state.index == 1:\n'
            '            raise ValueError("boom")\n'
            '        return {"ce": F.cross_entropy(out["logits"], batch.y)}')
    plugin.write_text(METHOD.format(imports="", name=name, body=body))
    raising = plugin.read_text().splitlines().index('            raise ValueError("boom")') + 1
    out = tmp_path / "run"
    capsys.readouterr()
    assert _cli_run(tmp_path, plugin, name, out) == 2
    line = _one_error_line(capsys)
    assert f"plugin method '{name}'" in line and "ValueError: boom" in line and "loss()" in line
    assert f"{plugin}:{raising}" in line
    assert str(out / "run.log") in line and line.endswith(f"cilkit run --resume {out}")
    log = (out / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and 'raise ValueError("boom")' in log
    assert len(_results(out)["states"]) == 1  # state 1 is kept: the run resumes from it


def test_a_plugin_that_exits_on_import_is_one_line_naming_it(tmp_path, capsys, registries):
    """issue 37 item 12: ``sys.exit`` in a plugin's import is one line naming the plugin (exit 2)."""
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(3)\n")
    capsys.readouterr()
    assert _cli_run(tmp_path, plugin, "finetune", tmp_path / "run") == 2
    line = _one_error_line(capsys)
    assert f"plugin '{plugin}'" in line and "sys.exit(3)" in line
    assert not (tmp_path / "run").exists()


def test_an_error_raised_in_cilkits_code_stays_a_traceback(tmp_path, capsys, registries):
    """issue 37 item 12: a plugin that calls cilkit, which raises there: the deepest frame is
    cilkit's (maybe our bug), so the exception propagates as a traceback."""
    name = f"calls_{tmp_path.name}".replace("-", "_")
    plugin = tmp_path / f"{name}.py"
    plugin.write_text(METHOD.format(imports="", name=name, body="        return super().loss(ctx, None, out)"))
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'y'"):
        _cli_run(tmp_path, plugin, name, tmp_path / "run")
