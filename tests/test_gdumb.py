"""GDumb (Prabhu et al., ECCV 2020): the greedy class-balanced sampler against a transcription of
the original loop (Mai et al.'s ``greedy_balancing_update``), the fresh model of every state,
the memory as the only training set, and runs on digits (end to end, resumed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import strip_timings, tiny_config

from cilkit.settings.config import load_config
from cilkit.common.errors import UserError
from cilkit.methods.gdumb import GDumb, greedy_update
from cilkit.models import build_model
from cilkit.run.loop import Run
from cilkit.common.seeding import derive_seed, seeded_generator


# ----- the sampler ------------------------------------------------------------------------------------
class OriginalLoop:
    """A transcription of ``Gdumb.greedy_balancing_update`` (RaptorMai/online-continual-learning,
    agents/gdumb.py), one sample at a time, with ``random.randrange(n)`` replaced by
    ``int(u * n)`` for a given uniform ``u``."""

    def __init__(self, mem_size: int) -> None:
        self.mem_size = mem_size
        self.mem_img: dict[int, list[int]] = {}
        self.mem_c: dict[int, int] = {}

    def update(self, x: int, y: int, u: float) -> None:
        k_c = self.mem_size // max(1, len(self.mem_img))
        if y not in self.mem_img or self.mem_c[y] < k_c:
            if sum(self.mem_c.values()) >= self.mem_size:
                cls_max, most = None, -1
                for c in self.mem_c:  # max(): the first class met with the largest count
                    if self.mem_c[c] > most:
                        cls_max, most = c, self.mem_c[c]
                assert cls_max is not None
                idx = int(u * self.mem_c[cls_max])
                del self.mem_img[cls_max][idx]
                self.mem_c[cls_max] -= 1
            if y not in self.mem_img:
                self.mem_img[y] = []
                self.mem_c[y] = 0
            self.mem_img[y].append(x)
            self.mem_c[y] += 1


def test_a_worked_example_evicts_from_the_largest_class_first_come_on_ties():
    # memory full with 5 + 5 images of classes 0 and 1; class 2 streams in, K = 10
    memory = {0: [0, 1, 2, 3, 4], 1: [10, 11, 12, 13, 14]}
    out = greedy_update(memory, [20, 21, 22, 23, 24], [2] * 5, 10, [0.0] * 5)
    # 20: new class -> evict from class 0 (5 vs 5: the first) -> 4, 5, 1
    # 21: 1 < 10 // 3 -> evict from class 1 (5) -> 4, 4, 2
    # 22: 2 < 3 -> evict from class 0 (4 vs 4: the first) -> 3, 4, 3
    # 23, 24: 3 < 3 fails -> not stored
    assert out == {0: [2, 3, 4], 1: [11, 12, 13, 14], 2: [20, 21, 22]}
    assert list(out) == [0, 1, 2]
    assert memory == {0: [0, 1, 2, 3, 4], 1: [10, 11, 12, 13, 14]}  # the input is not changed


def test_the_evicted_image_is_the_drawn_one():
    out = greedy_update({0: [0, 1, 2, 3]}, [9], [1], 4, [0.6])  # int(0.6 * 4) = 2
    assert out == {0: [0, 1, 3], 1: [9]}


@pytest.mark.parametrize("seed", range(6))
def test_the_sampler_equals_the_original_loop_over_several_states(seed):
    g = torch.Generator().manual_seed(seed)
    budget = int(torch.randint(5, 40, (1,), generator=g))
    loop, memory = OriginalLoop(budget), {}
    first = 0
    for _ in range(4):  # 4 states of 1-3 new classes with 3-25 images each, in a shuffled stream
        n_new = int(torch.randint(1, 4, (1,), generator=g))
        classes = []
        for c in range(first, first + n_new):
            classes += [c] * int(torch.randint(3, 26, (1,), generator=g))
        first += n_new
        perm = torch.randperm(len(classes), generator=g).tolist()
        ys = [classes[i] for i in perm]
        xs = [1000 * y + i for i, y in enumerate(ys)]
        us = torch.rand(len(xs), generator=g, dtype=torch.float64).tolist()
        for x, y, u in zip(xs, ys, us):
            loop.update(x, y, u)
        memory = greedy_update(memory, xs, ys, budget, us)
        assert memory == loop.mem_img and list(memory) == list(loop.mem_img)
        assert {c: len(v) for c, v in memory.items()} == loop.mem_c


def test_a_long_stream_ends_balanced():
    g = torch.Generator().manual_seed(0)
    ys = torch.tensor([0] * 30 + [1] * 30 + [2] * 30)[torch.randperm(90, generator=g)].tolist()
    out = greedy_update({}, list(range(90)), ys, 20, torch.rand(90, generator=g).tolist())
    # 20 // 3 = 6 each, and then no image passes the rule: 2 slots stay free (the original's rule)
    assert [len(out[c]) for c in range(3)] == [6, 6, 6]
    # then 2 classes more, 30 images each: 20 // 5 = 4 each
    ys2 = torch.tensor([3] * 30 + [4] * 30)[torch.randperm(60, generator=g)].tolist()
    out = greedy_update(out, list(range(100, 160)), ys2, 20, torch.rand(60, generator=g).tolist())
    assert [len(out[c]) for c in range(5)] == [4] * 5


# ----- runs on digits ----------------------------------------------------------------------------------
def gdumb_config(tmp_path, *extra: str):
    return tiny_config(tmp_path, "method=gdumb", "threads=1", "state0_cache=null", "train.epochs=2",
                       "train.batch_size=16", *extra)


@pytest.fixture(scope="module")
def gdumb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gdumb")
    cfg = gdumb_config(tmp)
    run = Run(cfg, tmp / "run", progress=False)
    results = run.execute()
    return cfg, results, tmp / "run", run.scenario.order


def test_every_state_trains_on_the_balanced_memory_alone(gdumb_run):
    cfg, results, run_dir, order = gdumb_run
    assert results["complete"] and len(results["states"]) == 3
    for b, s in enumerate(results["states"]):
        n_seen = s["classes_seen"]
        assert s["train_images"] == 60  # K, state 0 included (fine-tuning trains on all its images)
        g = s["gdumb"]
        assert g["memory_images"] == 60 and g["per_class_max"] - g["per_class_min"] <= 1
        assert g["per_class_min"] == 60 // n_seen
        assert s["top1"] > 100.0 / n_seen  # better than chance
        mine = json.loads((run_dir / "memory" / f"state_{b:02d}.json").read_text())["exemplars"]
        stats = json.loads((run_dir / "stats" / f"state_{b:02d}.json").read_text())
        # what the state trained on (the statistics' train counts) is GDumb's memory
        counts = sorted(len(v) for v in mine.values())
        assert counts == sorted(stats["train_counts"].values()) and sum(counts) == 60
        assert len({i for v in mine.values() for i in v}) == 60
        # the run's memory is the sampler's: every seen class, the counts of GDumb's record
        assert sorted(mine) == sorted(str(order[c]) for c in range(n_seen))
        assert len(mine[str(order[s["new_classes"][0]])]) >= g["per_class_min"]
    assert results["states"][1]["gdumb"]["evicted"] > 0


def test_the_model_is_rebuilt_from_scratch_at_every_state(tmp_path):
    cfg = gdumb_config(tmp_path)
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    ctx = run.context(1)
    run.method.before_state(ctx)
    # a fresh model, built here: the run's backbone, seeded from (seed, "gdumb-init", 1)
    channels, size = run.dataset.train.geometry
    torch.manual_seed(derive_seed(cfg.seed, "gdumb-init", 1))
    fresh = build_model("convnet", in_channels=channels, image_size=size, width=8)
    fresh.add_classes(ctx.state.n_seen)
    now = run.model.state_dict()
    assert now.keys() == fresh.state_dict().keys()
    assert all(torch.equal(now[k], v) for k, v in fresh.state_dict().items())
    weights = [k for k in trained if k.endswith("weight")]
    assert weights and all(not torch.equal(trained[k], now[k][: trained[k].shape[0]]) for k in weights)


def test_train_set_is_the_sampler_memory_of_the_state(tmp_path):
    cfg = gdumb_config(tmp_path)
    run = Run(cfg, tmp_path / "r", progress=False)
    run.execute(until_state=0)
    method = run.method
    assert isinstance(method, GDumb)
    memory0 = {c: list(v) for c, v in method.buffer.items()}
    ctx = run.context(1)
    method.before_state(ctx)
    method.begin_round(ctx)
    # the state's stream, drawn here from its own seeded generator, through the original loop
    loop = OriginalLoop(60)
    loop.mem_img = {c: list(v) for c, v in memory0.items()}
    loop.mem_c = {c: len(v) for c, v in memory0.items()}
    train = ctx.state.train
    gen = seeded_generator(cfg.seed, "gdumb-stream", 1)
    stream = train[torch.randperm(train.numel(), generator=gen)]
    us = torch.rand(train.numel(), generator=gen, dtype=torch.float64)
    for x, y, u in zip(stream.tolist(), run.scenario.train_pos[stream].tolist(), us.tolist()):
        loop.update(x, y, u)
    expected = [i for c in ctx.state.seen for i in loop.mem_img.get(c, [])]
    assert method.train_set(ctx).tolist() == expected
    assert method.memory_candidates(ctx).tolist() == [i for c in ctx.state.new for i in loop.mem_img.get(c, [])]
    method.begin_round(ctx)  # asked again in the same state: the memory does not stream twice
    assert method.train_set(ctx).tolist() == expected


def test_state0_is_gdumbs_own_not_the_finetune_cache(tmp_path):
    from cilkit.run import state0cache

    keys = {}
    for name in ("finetune", "gdumb"):
        run = Run(tiny_config(tmp_path, f"method={name}", "threads=1"), tmp_path / name, progress=False)
        keys[name] = state0cache.method_signature(run.method)
    assert keys["finetune"]["hooks"]["train_set"] != keys["gdumb"]["hooks"]["train_set"]
    assert keys["gdumb"]["declared"] == {"gdumb_memory_total": 60}


@pytest.mark.parametrize("cut", [0, 1])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, gdumb_run, cut):
    cfg, full, full_dir, _ = gdumb_run
    cut_dir = tmp_path / "cut"
    Run(cfg, cut_dir, progress=False).execute(until_state=cut)
    resumed = Run(cfg, cut_dir, progress=False).execute(resume=True)
    assert strip_timings(resumed) == strip_timings(full)
    for sub in ("memory", "stats"):
        for b in range(3):
            name = f"{sub}/state_{b:02d}.json"
            assert (full_dir / name).read_bytes() == (cut_dir / name).read_bytes(), name


def test_gdumb_needs_a_total_memory(tmp_path):
    with pytest.raises(UserError, match="memory.total"):
        Run(tiny_config(tmp_path, "method=gdumb", "threads=1", "memory.total=null", "memory.per_class=5"),
            tmp_path / "r", progress=False)


@pytest.mark.parametrize("name", ["gdumb-fashion-mnist", "gdumb-cifar100-b0-10"])
def test_gdumb_configs_load(name):
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.method == "gdumb" and cfg.memory.total


def test_a_state0_cache_hit_streams_the_same_memory(tmp_path):
    """On a hit nothing trains in state 0, but begin_round still builds the memory: the run is
    the one that trained."""
    cfg = tiny_config(tmp_path, "method=gdumb", "threads=1", "train.epochs=2", "train.batch_size=16",
                      "scenario.states=2")
    first = Run(cfg, tmp_path / "a", progress=False).execute()
    second = Run(cfg, tmp_path / "b", progress=False).execute()
    assert first["states"][0]["state0_cached"] is False and second["states"][0]["state0_cached"] is True
    assert strip_timings(second) == strip_timings(first)
    for b in range(2):
        name = f"memory/state_{b:02d}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
