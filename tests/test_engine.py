import pytest
import torch
from helpers import tiny_config

from cilkit.settings.config import DataConfig, ScenarioConfig, TrainConfig
from cilkit.data import load_dataset
from cilkit.training.engine import make_optimizer, make_scheduler
from cilkit.training.protocol import FitSpec
from cilkit.run.loop import Run
from cilkit.run.setup import normalisation
from cilkit.cil.scenario import Scenario


def lrs(schedule, epochs=10, losses=None):
    cfg = TrainConfig(lr=0.1, schedule=schedule)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [p]}], FitSpec.of_state(cfg, 0))
    sched = make_scheduler(opt, cfg.schedule, epochs)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(losses[e])
        elif sched is not None:
            sched.step()
    return out


def test_multistep_decays_at_milestones():
    got = lrs({"type": "multistep", "milestones": [3, 6], "gamma": 0.1})
    assert got[:3] == [0.1] * 3 and got[3:6] == pytest.approx([0.01] * 3) and got[6:] == pytest.approx([0.001] * 4)


def test_cosine_decreases_to_zero():
    got = lrs({"type": "cosine"})
    assert got[0] == 0.1 and all(a > b for a, b in zip(got, got[1:])) and got[-1] < 0.01


def test_plateau_reduces_after_patience():
    got = lrs({"type": "plateau", "patience": 2, "gamma": 0.5}, losses=[1.0] * 10)
    assert got[:4] == [0.1] * 4 and got[4] == pytest.approx(0.05)


def test_constant():
    assert lrs({"type": "constant"}) == [0.1] * 10


def test_normalisation_from_state0_training_images_when_unknown():
    ds = load_dataset(DataConfig(name="digits"))
    assert ds.mean is None
    sc = Scenario(ScenarioConfig(initial=2, increment=2), ds.train.labels, ds.test.labels, 10, seed=0)
    mean, std = normalisation(ds, sc)
    x = ds.train.images[sc.state(0).train].double() / 255
    assert mean.item() == pytest.approx(x.mean().item(), rel=1e-5)
    assert std.item() == pytest.approx(x.std().item(), rel=1e-4)


def test_known_statistics_are_used_as_given():
    ds = load_dataset(DataConfig(name="digits", mean=[0.5], std=[0.25]))
    sc = Scenario(ScenarioConfig(), ds.train.labels, ds.test.labels, 10, seed=0)
    mean, std = normalisation(ds, sc)
    assert mean.tolist() == [0.5] and std.tolist() == [0.25]


def test_bf16_autocast_and_channels_last_run_on_cpu(tmp_path):
    res = Run(tiny_config(tmp_path, "amp=true", "channels_last=true", "scenario.states=2"), tmp_path / "r",
              progress=False).execute()
    assert res["complete"] and res["states"][-1]["top1"] > 0


def test_a_model_torch_compile_cannot_compile_runs_eagerly_after_one_warning(tmp_path, monkeypatch, capsys):
    def failing_compile(model, **kwargs):
        def compiled(x):
            raise RuntimeError("inductor: no working C++ compiler")
        return compiled

    eager = Run(tiny_config(tmp_path, "scenario.states=2", "state0_cache=null"), tmp_path / "eager",
                progress=False).execute()
    monkeypatch.setattr(torch, "compile", failing_compile)
    res = Run(tiny_config(tmp_path, "scenario.states=2", "state0_cache=null", "compile=true"), tmp_path / "c",
              progress=False).execute()
    warnings = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0]
    assert [s["top1"] for s in res["states"]] == [s["top1"] for s in eager["states"]]


def test_every_rank_slice_of_an_augmented_batch_is_what_one_process_gets():
    from cilkit.data.base import TensorImages
    from cilkit.data.transforms import Augment

    images = TensorImages(torch.randint(0, 256, (11, 1, 6, 6), dtype=torch.uint8), torch.arange(11) % 3)
    args = dict(mean=torch.tensor([0.5]), std=torch.tensor([0.25]), augment=Augment(crop_pad=2, flip=True),
                shuffle=True)
    whole = list(images.batches(torch.arange(11), 4, generator=torch.Generator().manual_seed(5), **args))
    for world in (2, 3):
        slices = [list(images.batches(torch.arange(11), 4, generator=torch.Generator().manual_seed(5),
                                      shard=(r, world), **args)) for r in range(world)]
        for b, (x, y, idx) in enumerate(whole):
            assert torch.equal(torch.cat([s[b][0] for s in slices]), x)
            assert torch.equal(torch.cat([s[b][2] for s in slices]), idx)


def test_every_rank_slice_of_a_file_batch_is_what_one_process_gets(tmp_path):
    from PIL import Image

    from cilkit.data.files import FileImages
    from cilkit.data.transforms import Augment

    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(torch.randint(0, 256, (12, 10, 3), dtype=torch.uint8).numpy()).save(p)
        paths.append(str(p))
    images = FileImages(paths, torch.arange(7) % 2, image_size=8)
    args = dict(mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3),
                augment=Augment(resized_crop=True, flip=True), shuffle=True)
    whole = list(images.batches(torch.arange(7), 3, generator=torch.Generator().manual_seed(1), **args))
    slices = [list(images.batches(torch.arange(7), 3, generator=torch.Generator().manual_seed(1), shard=(r, 3),
                                  **args)) for r in range(3)]
    for b, (x, _, idx) in enumerate(whole):  # the last batch has one image: two ranks get none
        assert torch.equal(torch.cat([s[b][0] for s in slices]), x)
        assert torch.equal(torch.cat([s[b][2] for s in slices]), idx)
