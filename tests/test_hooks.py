"""The hook protocol: queries that change nothing, the round / epoch / train-mode hooks, the
batch-composition seam, and a method's own results and files under its name."""

from __future__ import annotations

import ast
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import method_cases, registered_methods, tiny_config

from cilkit.data.base import TensorImages
from cilkit.training.engine import replay_order
from cilkit.methods import METHODS
from cilkit.methods.finetune import Finetune
from cilkit.rundir.layout import RunLayout
from cilkit.run.loop import Run

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cilkit" / "methods"
# paths the defaults do not take, beside every registered method with its quick settings
VARIANTS = {"active-entropy": ("active", ["active.classical=entropy"]),
            "bic-random": ("bic", ["memory.selection=random"])}


def _frozen(method) -> bytes:
    """Everything the method holds, as bytes (a changed tensor, list or counter changes them)."""
    return pickle.dumps({k: v for k, v in vars(method).items() if k not in ("run_config", "cfg")})


def _registered_in(path: Path) -> list[str]:
    """The names a file registers: its ``@register("name")`` / ``@register_method("name")`` lines."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and isinstance(d.func, ast.Name)
                        and d.func.id in ("register", "register_method") and isinstance(d.args[0], ast.Constant)):
                    names.append(d.args[0].value)
    return names


def test_every_method_file_of_the_package_is_registered_and_covered():
    """Importing cilkit registers every method written in the package, listed nowhere else, and
    the tests parametrised over the registry cover each one."""
    written = [name for path in sorted(PACKAGE.rglob("*.py")) for name in _registered_in(path)]
    assert len(written) >= 15
    assert set(written) <= set(METHODS)
    assert set(written) <= set(registered_methods())


@pytest.mark.parametrize("name, options", method_cases(VARIANTS))
def test_train_set_and_memory_candidates_are_pure_queries(tmp_path, name, options):
    """Asked twice in the same round, train_set gives the same indices and changes nothing in
    the method (set-up is begin_round's); likewise memory_candidates. Every registered method."""
    cfg = tiny_config(tmp_path, f"method={name}", "train.epochs=1", "threads=1", "state0_cache=null", *options)
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    ctx = run.context(1)  # as the runner starts state 1
    run.method.before_state(ctx)
    run.method.begin_round(ctx)
    before = _frozen(run.method)
    first, second = run.method.train_set(ctx), run.method.train_set(ctx)
    assert torch.equal(first, second) and first.numel() > 0
    assert _frozen(run.method) == before
    assert torch.equal(run.method.memory_candidates(ctx), run.method.memory_candidates(ctx))
    assert _frozen(run.method) == before


def test_the_context_is_read_only_but_for_the_record(tmp_path):
    run = Run(tiny_config(tmp_path, "threads=1"), tmp_path / "r", progress=False)
    ctx = run.context(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.teacher = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.round = 3  # type: ignore[misc]
    ctx.record.results["x"] = 1  # what a method writes
    assert run.context(0).record.results == {}  # every context starts a fresh record


class Recording(Finetune):
    """Fine-tuning that records the fit hooks' calls and writes results and a file of its own."""

    name = "recording"
    calls: list = []

    def begin_round(self, ctx):
        Recording.calls.append(("round", ctx.state.index, ctx.round))

    def train_mode(self, ctx, model):
        super().train_mode(ctx, model)
        model.backbone.eval()  # fixed batch-norm statistics, as LUCIR's balanced finetuning
        Recording.calls.append(("mode", ctx.state.index))

    def begin_epoch(self, ctx, epoch):
        Recording.calls.append(("begin", ctx.state.index, epoch))

    def end_epoch(self, ctx, record):
        Recording.calls.append(("end", ctx.state.index, record.epoch, record.loss))

    def after_state(self, ctx):
        ctx.record.results["epochs_seen"] = sum(1 for c in Recording.calls if c[0] == "end" and c[1] == ctx.state.index)
        ctx.record.files["note"] = f"state {ctx.state.index}"


def test_round_epoch_and_train_mode_hooks_and_the_methods_own_results(tmp_path):
    cfg = tiny_config(tmp_path, "threads=1", "train.epochs=3", "state0_cache=null", "scenario.states=2")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.method = Recording(cfg)
    Recording.calls = []
    bn = {k: v.clone() for k, v in run.model.backbone.state_dict().items() if "running" in k}
    results = run.execute()
    assert [c for c in Recording.calls if c[0] == "round"] == [("round", 0, 0), ("round", 1, 0)]
    per_state = [[c[0] for c in Recording.calls if c[0] != "round" and c[1] == b] for b in (0, 1)]
    assert per_state == [["mode", "begin", "end"] * 3] * 2  # train mode and begin before every epoch
    assert [c[2] for c in Recording.calls if c[0] == "begin"] == [1, 2, 3, 1, 2, 3]
    history = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in history if line["kind"] == "epoch"]
    assert [c[3] for c in Recording.calls if c[0] == "end"] == pytest.approx(losses)
    # the backbone stayed in eval mode in every epoch: its batch-norm statistics never moved
    after = {k: v for k, v in run.model.backbone.state_dict().items() if "running" in k}
    assert bn and all(torch.equal(bn[k], after[k]) for k in bn)
    # the method's own results under its name; its files in <run>/<name>/
    assert [s["recording"] for s in results["states"]] == [{"epochs_seen": 3}, {"epochs_seen": 3}]
    assert "epochs_seen" not in results["states"][0]
    for b in (0, 1):
        assert json.loads(RunLayout(tmp_path / "r").method_file("recording", b).read_text()) == {"note": f"state {b}"}


class Replay(Finetune):
    """Fine-tuning whose every full batch holds 3 replayed exemplars (the batch-composition seam)."""

    name = "replay"
    batches: list = []

    def batch_order(self, ctx, indices, batch_size, generator):
        old = torch.isin(indices, ctx.memory.indices(ctx.state.old))
        return replay_order(indices[~old], indices[old], batch_size, 3, generator)

    def loss(self, ctx, batch, out):
        Replay.batches.append((ctx.state.index, batch.idx.cpu().clone(), batch.y.cpu().clone()))
        return super().loss(ctx, batch, out)


def test_a_method_composes_its_batches_with_a_fixed_replay_ratio(tmp_path):
    cfg = tiny_config(tmp_path, "threads=1", "train.epochs=2", "state0_cache=null", "scenario.states=2",
                      "train.batch_size=16")
    run = Run(cfg, tmp_path / "r", progress=False)
    run.method = Replay(cfg)
    Replay.batches = []
    run.execute()
    n_old = run.scenario.state(1).n_old
    state1 = [(idx, y) for b, idx, y in Replay.batches if b == 1]
    full = [y for idx, y in state1 if idx.numel() == 16]
    assert full and all(int((y < n_old).sum()) == 3 for y in full)  # 3 of 16 replayed, in every full batch
    new_seen = torch.cat([idx[y >= n_old] for idx, y in state1])
    n_new = run.scenario.state(1).train.numel()
    assert new_seen.numel() == 2 * n_new and torch.unique(new_seen).numel() == n_new  # each new image once per epoch


def test_replay_order_by_hand():
    gen = torch.Generator().manual_seed(0)
    new, old = torch.arange(10), torch.arange(100, 104)
    order = replay_order(new, old, batch_size=5, replay_per_batch=2, generator=gen)
    # 10 new images, 3 per batch: 3 full batches (9 new + 6 replayed, the 4 old cycled), then 1 new
    assert order.numel() == 16
    batches = [order[i:i + 5] for i in range(0, 15, 5)]
    assert all((b >= 100).sum() == 2 and torch.equal(b[3:] >= 100, torch.tensor([True, True])) for b in batches)
    assert sorted(order[order < 100].tolist()) == list(range(10))
    replayed = order[order >= 100].tolist()
    assert sorted(replayed[:4]) == [100, 101, 102, 103]  # every exemplar once before any repeats
    with pytest.raises(ValueError):
        replay_order(new, old, 5, 5, gen)


def test_the_default_order_is_the_generators_permutation():
    """The engine's default epoch order is torch.randperm of the state's generator, drawn before
    any augmentation (what every recorded number was made with)."""
    images = TensorImages(torch.zeros(7, 1, 2, 2, dtype=torch.uint8), torch.arange(7))
    indices = torch.arange(10, 17)

    class Default(Finetune):
        pass

    method = Default.__new__(Default)
    got = method.batch_order(None, indices, 3, torch.Generator().manual_seed(5))
    assert torch.equal(got, indices[torch.randperm(7, generator=torch.Generator().manual_seed(5))])
    ys = [y for _, y, _ in images.batches(torch.arange(7), 3, mean=torch.zeros(1), std=torch.ones(1),
                                          order=lambda i, g: i.flip(0), generator=None)]
    assert torch.cat(ys).tolist() == [6, 5, 4, 3, 2, 1, 0]
