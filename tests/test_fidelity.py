"""The maths of the methods against values computed by hand (scalar arithmetic with ``math``, no
torch loss function), and one whole run on image files."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_config, total
from PIL import Image

from cilkit.cli import main
from cilkit.settings.config import ScenarioConfig
from cilkit.data.base import Augment
from cilkit.methods.base import Batch, distillation_kl
from cilkit.methods.icarl import ICaRL, icarl_bce
from cilkit.methods.nme import exemplar_means, nme_scores
from cilkit.cil.scenario import Scenario


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(z: float, t: float) -> float:
    """-[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))]"""
    return -(t * math.log(sigmoid(z)) + (1 - t) * math.log(1 - sigmoid(z)))


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


# ----- distillation (Hinton et al. 2015), shared by BiC and iCaRL's ce_kd ------------------------
def test_distillation_is_the_cross_entropy_of_the_softened_teacher():
    # student (1, 0), teacher (0, 1), T = 2: target softmax(0, 0.5) = (0.3775, 0.6225),
    # log softmax(0.5, 0) = (-0.4741, -0.9741): loss = 0.3775 * 0.4741 + 0.6225 * 0.9741 = 0.7853
    loss = distillation_kl(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=2.0)
    assert loss.item() == pytest.approx(0.785306649781034, rel=1e-6)
    # averaged over the batch: a second, identical pair leaves it unchanged, a confident agreeing
    # pair (student = teacher = (10, -10)) pulls it toward its own tiny value
    two = distillation_kl(torch.tensor([[1.0, 0.0], [10.0, -10.0]]), torch.tensor([[0.0, 1.0], [10.0, -10.0]]), 2.0)
    logp = log_softmax([5.0, -5.0])  # student = teacher: the loss is the entropy of softmax(5, -5)
    tail = -sum(math.exp(v) * v for v in logp)
    assert two.item() == pytest.approx((0.785306649781034 + tail) / 2, rel=1e-6)


# ----- iCaRL's loss --------------------------------------------------------------------------------
def _icarl_ctx(tmp_path, teacher_logits, n_old, n_classes=10, *options):
    labels = torch.arange(n_classes).repeat(2)
    scenario = Scenario(ScenarioConfig(order=list(range(n_classes)), initial=2, increment=1), labels, labels,
                        n_classes, 0)
    method = ICaRL(tiny_config(tmp_path, "method=icarl", *options))
    state = scenario.state(n_old - 1 if n_old > 0 else 0)
    ctx = SimpleNamespace(state=state, scenario=scenario,
                          teacher_out={"logits": teacher_logits} if n_old else None)  # what the engine hands the loss
    return method, ctx


def test_icarl_bce_sums_over_the_seen_classes_with_sigmoid_targets_from_the_teacher(tmp_path):
    # state with 2 old classes (0, 1) and 1 new (2); two images of classes 2 and 0
    z = [[2.0, -1.0, 0.5], [0.3, 0.2, -0.4]]
    teacher = [[1.0, -2.0], [-0.5, 0.7]]
    y = [2, 0]
    # targets: old classes -> sigmoid of the teacher's logits, new class -> its one-hot label
    targets = [[sigmoid(teacher[i][0]), sigmoid(teacher[i][1]), 1.0 if y[i] == 2 else 0.0] for i in range(2)]
    per_image = [sum(bce(z[i][j], targets[i][j]) for j in range(3)) for i in range(2)]
    expected = sum(per_image) / 2  # summed over the seen classes, averaged over the batch
    method, ctx = _icarl_ctx(tmp_path, torch.tensor(teacher), n_old=2)
    assert ctx.state.n_old == 2 and ctx.state.n_seen == 3
    batch = Batch(x=torch.zeros(2, 1), y=torch.tensor(y), idx=torch.arange(2), teacher=ctx.teacher_out)
    got = total(method.loss(ctx, batch, {"logits": torch.tensor(z)}))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the original code's reduction: the mean over the batch and the run's 10 output units
    mean_method, _ = _icarl_ctx(tmp_path, torch.tensor(teacher), 2, 10, "icarl.bce_reduction=mean")
    assert total(mean_method.loss(ctx, batch, {"logits": torch.tensor(z)})).item() == pytest.approx(expected / 10, rel=1e-6)
    # state 0 (no teacher): one-hot targets only
    z0 = [[0.4, -0.3]]
    method0, ctx0 = _icarl_ctx(tmp_path, None, n_old=0)
    b0 = Batch(x=torch.zeros(1, 1), y=torch.tensor([1]), idx=torch.arange(1))
    assert total(method0.loss(ctx0, b0, {"logits": torch.tensor(z0)})).item() == pytest.approx(
        bce(0.4, 0.0) + bce(-0.3, 1.0), rel=1e-6)
    assert icarl_bce(torch.tensor(z0), torch.tensor([[0.0, 1.0]]), divisor=4).item() == pytest.approx(
        (bce(0.4, 0.0) + bce(-0.3, 1.0)) / 4, rel=1e-6)


def test_icarl_ce_kd_is_cross_entropy_plus_distillation_of_the_old_logits(tmp_path):
    z = [[2.0, -1.0, 0.5]]
    teacher = [[1.0, -2.0]]
    ce = -log_softmax(z[0])[2]
    target = [math.exp(v) for v in log_softmax([teacher[0][0] / 2, teacher[0][1] / 2])]
    student = log_softmax([z[0][0] / 2, z[0][1] / 2])
    kd = -(target[0] * student[0] + target[1] * student[1])
    method, ctx = _icarl_ctx(tmp_path, torch.tensor(teacher), 2, 10, "icarl.loss=ce_kd")
    batch = Batch(x=torch.zeros(1, 1), y=torch.tensor([2]), idx=torch.arange(1), teacher=ctx.teacher_out)
    assert total(method.loss(ctx, batch, {"logits": torch.tensor(z)})).item() == pytest.approx(ce + kd, rel=1e-6)


# ----- nearest mean of exemplars -------------------------------------------------------------------
class _Memory:
    def __init__(self, per_class: dict[int, list[int]]) -> None:
        self.per_class = per_class

    def of_class(self, c: int) -> torch.Tensor:
        return torch.tensor(self.per_class.get(c, []), dtype=torch.int64)

    def indices(self, classes: range) -> torch.Tensor:
        return torch.cat([self.of_class(c) for c in classes])


def _nme_ctx(flip: bool):
    # training images 0..5: class positions 0, 0, 1, 2, 2, 2; class 2 is new and has no exemplar
    # (its training images 3, 4, 5 are at hand), old class 1 has none (its image 2 is gone)
    plain = {0: [2.0, 0.0], 1: [0.0, 3.0], 3: [1.0, 1.0], 4: [3.0, 3.0], 5: [0.0, -1.0]}
    flipped = {0: [0.0, 2.0], 1: [0.0, 1.0], 3: [1.0, 0.0], 4: [5.0, 0.0], 5: [0.0, -4.0]}

    def train_features(model, idx, hflip=False):
        table = flipped if hflip else plain
        return torch.tensor([table[int(i)] for i in idx])

    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    scenario = Scenario(ScenarioConfig(order=[0, 1, 2], initial=2, increment=1), labels, labels, 3, 0)
    return SimpleNamespace(
        state=scenario.state(1), scenario=scenario, memory=_Memory({0: [0, 1]}),
        dataset=SimpleNamespace(augment=Augment(flip=flip)),
        engine=SimpleNamespace(train_features=train_features),
    )


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))]


def test_nme_class_means_average_the_flips_and_fall_back_to_a_new_class_images():
    means = exemplar_means(_nme_ctx(flip=True), model=None)
    # class 0: unit features (1, 0), (0, 1) and their flips' (0, 1), (0, 1): mean (0.25, 0.75)
    assert means[0].tolist() == pytest.approx(_unit([0.25, 0.75]), abs=1e-6)
    # class 2, no exemplar but new: its training images 3, 4, 5 and their flips
    expected = _unit(_mean([_unit(v) for v in ([1, 1], [3, 3], [0, -1], [1, 0], [5, 0], [0, -4])]))
    assert means[2].tolist() == pytest.approx(expected, abs=1e-6)
    # old class 1 has no exemplar: no mean, and NME never predicts it
    assert torch.isnan(means[1]).all()
    scores = nme_scores(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), means)
    assert torch.isinf(scores[:, 1]).all() and scores[0].argmax() == 0
    # squared distance of a unit feature to a unit mean: 2 - 2 cos
    assert scores[0, 0].item() == pytest.approx(-(2 - 2 * _unit([0.25, 0.75])[1]), abs=1e-6)
    # without flips in training, the flipped images are not used: class 0 -> (0.5, 0.5)
    plain = exemplar_means(_nme_ctx(flip=False), model=None)
    assert plain[0].tolist() == pytest.approx(_unit([0.5, 0.5]), abs=1e-6)


# ----- a whole run on image files --------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_on_an_image_folder_of_digits_end_to_end(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "images"
    rng = np.random.RandomState(0)
    for c in range(4):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        for split, part in (("train", idx[:30]), ("val", idx[30:40])):
            for i in part:
                (root / split / f"digit{c}").mkdir(parents=True, exist_ok=True)
                grey = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(np.stack([grey] * 3, axis=-1)).resize((16, 16), Image.NEAREST).save(
                    root / split / f"digit{c}" / f"{i}.png")
    (tmp_path / "run.yaml").write_text(f"""
name: files
seed: 0
method: icarl
data: {{name: imagefolder, root: {root}, image_size: 16, workers: 0}}
scenario: {{order: [0, 1, 2, 3], initial: 2, increment: 2}}
memory: {{total: 20, selection: herding}}
model: {{backbone: lenet}}
train: {{epochs: 8, batch_size: 16, lr: 0.05, schedule: {{type: constant}}}}
state0_cache: null
threads: 1
""")
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["complete"] and res["dataset"] == "imagefolder" and len(res["states"]) == 2
    assert [s["classes_seen"] for s in res["states"]] == [2, 4]
    assert res["states"][0]["top1"] > 80  # digits 0 and 1 on 16-pixel files
    npz = np.load(tmp_path / "out" / "scores" / "state_01.npz")
    assert npz["labels"].shape == (40,) and npz["scores"].shape == (40, 4)  # 10 files of each class
    mem = json.loads((tmp_path / "out" / "memory" / "state_01.json").read_text())["exemplars"]
    assert sorted(mem) == ["0", "1", "2", "3"] and sum(len(v) for v in mem.values()) == 20
    assert all(0 <= i < 120 for ids in mem.values() for i in ids)  # indices into the 120 training files


# ----- the LeNet backbone ------------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 8), (3, 64)])
def test_lenet_gives_84_features_for_any_channel_count_and_size(channels, size):
    from cilkit.models import build_backbone, build_model

    torch.manual_seed(0)
    net = build_backbone("lenet", in_channels=channels, image_size=size)
    assert net.out_dim == 84 and net.fc1.in_features == 16 * 5 * 5  # LeNet-5's 400 -> 120 -> 84
    out = net(torch.randn(3, channels, size, size))
    assert out.shape == (3, 84) and (out >= 0).all()
    assert build_model("lenet", in_channels=channels, image_size=size).backbone.out_dim == 84
    # LUCIR's variant without the last ReLU can give negative features
    bare = build_backbone("lenet", in_channels=channels, image_size=size, last_relu=False)
    assert (bare(torch.randn(8, channels, size, size)) < 0).any()


def test_lenet_on_28_pixels_is_the_lenet5_layout():
    from cilkit.models import build_backbone

    net = build_backbone("lenet", in_channels=1, image_size=28)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,)]
    assert sum(p.numel() for p in net.parameters()) == 60856
    # a small input is padded to 28 pixels: an 8x8 image gives what its padded 28x28 version gives
    x = torch.randn(1, 1, 8, 8)
    assert torch.allclose(net(x), net(torch.nn.functional.pad(x, (10, 10, 10, 10))))


# ----- the papers' protocols as configs -------------------------------------------------------------
def test_the_papers_cifar100_configs_carry_their_settings():
    from pathlib import Path

    from cilkit.settings.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    icarl = load_config(configs / "icarl-cifar100-b0-10.yaml")
    assert (icarl.method, icarl.model.backbone, icarl.memory.total, icarl.scenario.initial, icarl.scenario.increment) == \
        ("icarl", "resnet32", 2000, 10, 10)
    t = icarl.train
    assert (t.lr, t.epochs, t.batch_size, t.momentum, t.schedule.milestones, t.schedule.gamma) == \
        (2.0, 70, 128, 0.9, [49, 63], 0.2)
    assert icarl.method_options("icarl")["bce_reduction"] == "mean"  # lr 2.0 belongs to the original's mean
    lucir_settings = load_config(configs / "cifar100-b0-10.yaml").train
    assert (lucir_settings.lr, lucir_settings.epochs) == (0.1, 160)
    for steps, increment in ((5, 10), (10, 5)):
        sir = load_config(configs / f"sir-cifar100-b50-{steps}steps.yaml")
        assert (sir.method, sir.scenario.initial, sir.scenario.increment, sir.memory.per_class) == ("sir", 50, increment, 20)
        lucir = load_config(configs / f"lucir-cifar100-b50-{steps}steps.yaml")
        assert sir.model == lucir.model and sir.scenario == lucir.scenario
    # the paper's own setting: SIR on PODNet, with PODNet's training settings and options
    sir5 = load_config(configs / "sir-cifar100-b50-5steps.yaml")
    podnet5 = load_config(configs / "podnet-cifar100-b50-5steps.yaml")
    assert sir5.method_options("sir")["base"] == "podnet" and sir5.train == podnet5.train
    assert sir5.method_options("podnet") == podnet5.method_options("podnet")


@pytest.mark.parametrize(("steps", "increment"), [(5, 10), (10, 5), (25, 2), (50, 1)])
def test_the_podnet_configs_are_the_papers_cifar_protocol(steps, increment):
    """The authors' options/podnet/podnet_cnn_cifar100.yaml, transcribed: B50, 20 exemplars per
    class, 160 epochs of SGD lr 0.1 on a cosine schedule, 10 proxies, lambda_c 3, lambda_f 1,
    NCA margin 0 (the original's 0.6 is cancelled by its code), 20 epochs of finetuning at 0.05."""
    from pathlib import Path

    from cilkit.settings.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"podnet-cifar100-b50-{steps}steps.yaml")
    assert (cfg.method, cfg.scenario.initial, cfg.scenario.increment, cfg.memory.per_class) == ("podnet", 50, increment, 20)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.schedule.type, cfg.train.weight_decay) == (160, 0.1, "cosine", 5e-4)
    o = cfg.method_options("podnet")
    assert (o["proxies_per_class"], o["lambda_spatial"], o["lambda_flat"], o["nca_margin"]) == (10, 3.0, 1.0, 0.0)
    assert (o["finetune"], o["finetune_epochs"], o["finetune_lr"]) == (True, 20, 0.05)


def test_il2m_maps_each_old_class_to_its_state_of_birth_with_a_large_first_state():
    """First state of 5 classes, then states of 2: classes 0-4 were born in state 0, 5-6 in
    state 1, 7-8 in state 2; in state 3 (classes 9-10 new) each old class's score is scaled by
    init/cur mean times conf[3] / conf[birth], checked by hand on one row."""
    from cilkit.cil.rectify import born_states, il2m_from_stats

    ends = [5, 7, 9, 11]
    assert born_states(9, ends) == [0, 0, 0, 0, 0, 1, 1, 2, 2]
    conf = [8.0, 4.0, 2.0, 1.0]
    stats = {
        "state": 3, "n_old": 9, "state_ends": ends, "conf": conf,
        "init_mean": {str(o): 2.0 for o in range(9)},
        "cur_mean": {str(o): 1.0 for o in range(9)},
    }
    logits = torch.tensor([[1.0] * 9 + [5.0, 0.0], [9.0] + [0.0] * 10], dtype=torch.float64)
    out = il2m_from_stats(logits, stats)
    expected_row0 = [1.0 * 2.0 * conf[3] / conf[s] for s in [0, 0, 0, 0, 0, 1, 1, 2, 2]] + [5.0, 0.0]
    assert torch.allclose(out[0], torch.tensor(expected_row0, dtype=torch.float64))
    assert torch.equal(out[1], logits[1])  # top-1 is old: left as it is
