"""The data path of a run: what a state trained on is recorded once, the rectifiers stand
alone, the run-directory layout has one owner, resume needs nothing but the checkpoint."""

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import strip_timings, tiny_config

import cilkit
from cilkit.cli import main
from cilkit.methods.finetune import Finetune
from cilkit.cil.rectify import il2m_factors, il2m_rectify
from cilkit.rundir.layout import RunLayout
from cilkit.rundir.readers import RESULTS_VERSION
from cilkit.run.loop import Run

SRC = Path(cilkit.__file__).parent


class CountingFinetune(Finetune):
    """Fine-tuning that counts its train_set calls and keeps what each state's statistics saw
    (``statistics_warnings`` is the hook called with the state's statistics)."""

    calls = 0
    seen: list = []

    def train_set(self, ctx):
        CountingFinetune.calls += 1
        return super().train_set(ctx)

    def statistics_warnings(self, ctx, stats):
        CountingFinetune.seen.append((ctx.state.index, ctx.trained.rounds[-1].clone(),
                                      ctx.trained.old_exemplars.clone()))
        return []


def test_train_set_is_called_once_per_round_and_the_statistics_use_what_was_trained(tmp_path):
    cfg = tiny_config(tmp_path, "state0_cache=null")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.method = CountingFinetune(cfg)
    CountingFinetune.calls, CountingFinetune.seen = 0, []
    run.execute()
    assert CountingFinetune.calls == 3  # three states, one round each: never called again
    for b, trained, old in CountingFinetune.seen:
        stats = json.loads(RunLayout(tmp_path / "r").stats(b).read_text())
        counts = torch.bincount(run.scenario.train_pos[trained], minlength=stats["classes_seen"])
        assert stats["train_counts"] == {str(c): int(n) for c, n in enumerate(counts.tolist())}
        assert sum(stats["cur_mean_images"].values()) == old.numel()
        assert set(old.tolist()) <= set(trained.tolist())  # the exemplars were trained on


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_rectifiers_import_nothing_of_the_run_machinery():
    imported = _imports(SRC / "cil" / "rectify.py")
    assert {m for m in imported if m.startswith("cilkit")} <= {"cilkit.common.errors"}
    for user in ("methods/il2m.py", "methods/active/method.py", "methods/active/acquisition.py"):
        cilkit_imports = {m for m in _imports(SRC / user) if m.startswith("cilkit")}
        assert not cilkit_imports & {"cilkit.run.loop", "cilkit.analysis.report", "cilkit.analysis.calibrate", "cilkit.training.class_statistics"}, user


def test_no_module_is_over_about_400_lines():
    long = {p.relative_to(SRC).as_posix(): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long


def test_only_the_runner_and_the_layout_name_run_files():
    """Run-directory paths are built by RunLayout alone: no other module spells them."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).as_posix() == "rundir/layout.py":
            continue
        text = path.read_text()
        for pattern in ('"scores" /', '"stats" /', '"checkpoints"', '/ "results.json"', '/ "config.yaml"',
                        'f"state_{'):
            if pattern in text:
                offenders.append(f"{path.relative_to(SRC)}: {pattern}")
    assert not offenders


def test_checkpoints_are_found_in_state_order_past_100(tmp_path):
    layout = RunLayout(tmp_path)
    for b in (99, 100, 7):
        layout.checkpoint(b).parent.mkdir(parents=True, exist_ok=True)
        layout.checkpoint(b).write_bytes(b"")
    (layout.checkpoint_dir / "notes.txt").write_text("not a checkpoint")
    assert [b for b, _ in layout.checkpoints()] == [7, 99, 100]
    assert layout.checkpoints()[-1][1].name == "state_100.pt"


def test_il2m_predicts_from_the_context_statistics_by_the_papers_rule(tmp_path):
    """IL2M's statistics come through the context (the method never reads stats/ back); its
    scores follow the paper's rule, computed here by hand from the statistics: when the top-1
    class is new, each old score is multiplied by init_mean/cur_mean * conf[now]/conf[born]."""
    cfg = tiny_config(tmp_path, "method=il2m", "state0_cache=null")
    run = Run(cfg, tmp_path / "r", progress=False)
    results = run.execute()
    assert results["primary_scores"] == "il2m"
    stats = run.statistics  # state 3 of 3: classes 0..3 in state 0, 4..6 in state 1, 7..9 in state 2
    ctx = dataclasses.replace(run.context(2), statistics=stats)
    n_old, seen = stats["n_old"], stats["classes_seen"]
    assert (n_old, seen, stats["state_ends"]) == (7, 10, [4, 7, 10])
    born = [0] * 4 + [1] * 3
    torch.manual_seed(0)
    logits = torch.randn(6, seen)
    logits[:3, 8] = 10.0  # top-1 new: rectified
    logits[3:, 2] = 10.0  # top-1 old: left alone
    expected = logits.clone().double()
    for row in range(3):
        for o in range(n_old):
            factor = (stats["init_mean"][str(o)] / stats["cur_mean"][str(o)]) * \
                (stats["conf"][2] / stats["conf"][born[o]])
            expected[row, o] = logits[row, o].double() * factor
    got = run.method.predict(ctx, {"logits": logits})
    assert torch.allclose(got.double(), expected, atol=1e-5)
    assert not torch.allclose(got[:3, :n_old], logits[:3, :n_old])  # the statistics did act


def test_resume_needs_no_stats_directory(tmp_path):
    """The statistics history travels in the checkpoint: deleting stats/ before a resume
    changes nothing (IL2M's later states read init_mean and conf of earlier ones)."""
    cfg = tiny_config(tmp_path, "method=il2m", "scenario.states=4", "scenario.initial=1", "scenario.increment=2")
    full = Run(cfg, tmp_path / "full", progress=False).execute()
    Run(cfg, tmp_path / "cut", progress=False).execute(until_state=1)
    shutil.rmtree(tmp_path / "cut" / "stats")
    resumed = Run(cfg, tmp_path / "cut", progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(full)


def test_a_results_file_from_a_newer_cilkit_is_refused_in_one_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "scenario.states=2")
    Run(cfg, tmp_path / "r", progress=False).execute()
    path = RunLayout(tmp_path / "r").results
    data = json.loads(path.read_text())
    data["version"] = RESULTS_VERSION + 1
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer cilkit" in err[0] and str(path) in err[0]


def test_il2m_guard_leaves_classes_with_a_nonpositive_mean_unrectified():
    """A negative current mean flips IL2M's factor (the original's behaviour, kept by default);
    ``guard_nonpositive`` leaves that class's scores as they are."""
    logits = torch.tensor([[1.0, 2.0, 5.0]])  # top-1 new (column 2) -> old columns rectified
    init_mean, cur_mean, conf_now, conf_old = [2.0, 3.0], [-1.0, 1.5], 4.0, [2.0, 2.0]
    flipped = il2m_rectify(logits, 2, init_mean, cur_mean, conf_now, conf_old)
    guarded = il2m_rectify(logits, 2, init_mean, cur_mean, conf_now, conf_old, guard_nonpositive=True)
    assert flipped[0, 0].item() == pytest.approx(1.0 * (2.0 / -1.0) * 2.0)  # -4: the sign flipped
    assert guarded[0, 0].item() == 1.0  # unrectified
    assert guarded[0, 1].item() == flipped[0, 1].item() == pytest.approx(2.0 * 2.0 * 2.0)
    assert il2m_factors(init_mean, cur_mean, conf_now, conf_old, True).tolist() == [1.0, 4.0]
