"""Issue 38 items 1-3: the long-tailed CIL protocols draw their training sets as the authors'
loaders do. Each expected value is a transcription of Long-Tailed-CIL's data code (written here,
on the same labels), never cilkit's own functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cilkit.cil.scenario import Scenario
from cilkit.settings.config import ScenarioConfig
from cilkit.settings.config import load_config
from cilkit.settings.packaged import resolve_config

ICARL_1993 = np.random.RandomState(1993).permutation(100).tolist()


def cifar_like_labels(per_class: int, n_classes: int, seed: int) -> np.ndarray:
    """Labels in a shuffled file order, ``per_class`` of each class (CIFAR's train file holds
    its 500 images per class interleaved)."""
    labels = np.repeat(np.arange(n_classes), per_class)
    np.random.RandomState(seed).shuffle(labels)
    return labels


def authors_cifar_lt_kept(labels: np.ndarray, n_classes: int, imb_factor: float, rand_number: int) -> dict[int, set[int]]:
    """LT-CIL's IMBALANCECIFAR100: counts int(img_max * f^(c / (C-1))) by class id, then per
    class id in increasing order a numpy shuffle of its indices, the first n kept."""
    img_max = len(labels) / n_classes
    counts = [int(img_max * (imb_factor ** (c / (n_classes - 1.0)))) for c in range(n_classes)]
    np.random.seed(rand_number)
    kept: dict[int, set[int]] = {}
    for c, n in zip(np.unique(labels), counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        kept[int(c)] = set(idx[:n].tolist())
    return kept


def lt_cifar_config(order, initial: int = 50, increment: int = 10) -> ScenarioConfig:
    return ScenarioConfig.model_validate({
        "order": order, "initial": initial, "increment": increment,
        "imbalance": {"profile": "longtail", "ratio": 100, "ordering": "label", "keep": "numpy_shuffle", "seed": 0}})


@pytest.mark.parametrize("order", [ICARL_1993, list(range(100))], ids=["shuffled-lt", "ordered-ltio"])
def test_cifar100_lt_keeps_exactly_the_images_lt_cil_keeps(order):
    labels = cifar_like_labels(500, 100, seed=5)
    test = np.repeat(np.arange(100), 100)
    sc = Scenario(lt_cifar_config(order), torch.from_numpy(labels), torch.from_numpy(test), 100, seed=3)
    expected = authors_cifar_lt_kept(labels, 100, 0.01, rand_number=0)
    for label, indices in expected.items():
        position = order.index(label)
        ours = set((sc.train_pos == position).nonzero().flatten().tolist())
        assert ours == indices, f"class {label}"
    counts = sc.imbalance["train_per_class"]
    assert counts[order.index(0)] == 500 and counts[order.index(99)] == 5
    assert sum(counts) == 10847  # the CIFAR-100-LT size Cao et al. (LDAM, NeurIPS 2019) report for rho = 100
    assert sc.imbalance["test_per_class"] == [100] * 100  # the test set stays balanced


def test_the_ordered_scenario_learns_the_head_first_and_the_shuffled_one_does_not():
    labels, test = cifar_like_labels(500, 100, seed=1), np.repeat(np.arange(100), 10)
    ordered = Scenario(lt_cifar_config(list(range(100))), torch.from_numpy(labels), torch.from_numpy(test), 100, 0)
    shuffled = Scenario(lt_cifar_config(ICARL_1993), torch.from_numpy(labels), torch.from_numpy(test), 100, 0)
    first_state = lambda sc: sum(sc.imbalance["train_per_class"][:50])  # noqa: E731
    by_hand_head = sum(int(500 * 0.01 ** (c / 99)) for c in range(50))
    assert first_state(ordered) == by_hand_head
    assert first_state(shuffled) == sum(int(500 * 0.01 ** (c / 99)) for c in ICARL_1993[:50])
    assert ordered.imbalance["train_per_class"] == sorted(ordered.imbalance["train_per_class"], reverse=True)


def test_the_run_seed_does_not_change_which_images_lt_cil_keeps():
    labels, test = cifar_like_labels(50, 10, seed=2), np.repeat(np.arange(10), 5)
    cfg = ScenarioConfig.model_validate({"order": list(range(10)), "initial": 4, "increment": 2, "imbalance": {
        "profile": "longtail", "ratio": 10, "ordering": "label", "keep": "numpy_shuffle", "seed": 0}})
    a = Scenario(cfg, torch.from_numpy(labels), torch.from_numpy(test), 10, seed=0)
    b = Scenario(cfg, torch.from_numpy(labels), torch.from_numpy(test), 10, seed=7)
    assert torch.equal(a.train_pos, b.train_pos)


def authors_list_counts(num_per_cls: list[int], shuffle_seed: int | None) -> list[int]:
    """LT-CIL's base_dataset.get_data for ImageNet-Subset-LT: counts by class position from the
    first class's count, shuffled by numpy (seeded by the run's seed) for the shuffled scenario."""
    img_max = num_per_cls[0]
    counts = [int(img_max * (0.01 ** (i / (len(num_per_cls) - 1.0)))) for i in range(len(num_per_cls))]
    if shuffle_seed is not None:
        np.random.seed(shuffle_seed)
        np.random.shuffle(counts)
    return counts


@pytest.mark.parametrize("ordering,shuffle_seed", [("position", None), ("numpy_shuffled", 4)])
def test_list_files_keep_the_first_images_of_each_class_in_file_order(ordering, shuffle_seed):
    n, per = 20, 130
    labels = cifar_like_labels(per, n, seed=9)
    order = np.random.RandomState(1993).permutation(n).tolist()
    cfg = ScenarioConfig.model_validate({"order": order, "initial": 10, "increment": 5, "imbalance": {
        "profile": "longtail", "ratio": 100, "ordering": ordering, "keep": "first"}})
    sc = Scenario(cfg, torch.from_numpy(labels), torch.from_numpy(np.arange(n)), n, seed=4)
    counts = authors_list_counts([per] * n, shuffle_seed)
    for p, label in enumerate(order):
        expected = np.where(labels == label)[0][: counts[p]].tolist()  # the loader stops at the count
        assert (sc.train_pos == p).nonzero().flatten().tolist() == expected


@pytest.mark.parametrize("name", ["fashion-mnist-lt-ordered", "fashion-mnist-lt-shuffled"])
def test_the_fashion_mnist_lt_protocols_are_lt_cil_at_cpu_scale(name):
    cfg = load_config(resolve_config(name))
    imb = cfg.scenario.imbalance
    assert (imb.profile, imb.ratio, imb.ordering, imb.keep, imb.seed) == ("longtail", 100, "label", "numpy_shuffle", 0)
    assert cfg.memory.per_class == 20 and (imb.shots.many, imb.shots.few) == (1200, 240)
    labels = cifar_like_labels(6000, 10, seed=0)
    sc = Scenario(cfg.scenario, torch.from_numpy(labels), torch.from_numpy(np.arange(10)), 10, seed=0)
    order = sc.order
    by_label = {order[p]: c for p, c in enumerate(sc.imbalance["train_per_class"])}
    assert [by_label[c] for c in range(10)] == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def test_lt_cil_figures_are_read_as_the_mean_over_tasks():
    """LT-CIL and DGR report FACIL's task-agnostic accuracy averaged over the tasks: after state 1
    of a 50 + 5 protocol, (acc on the 50 first classes + acc on the 5 new) / 2, not the accuracy
    over the 55 classes."""
    from cilkit.analysis.paper import run_figure
    from cilkit.settings.paper import PaperTarget

    from cilkit.analysis.paper import why_no_figure

    results = {"method": "icarl", "primary_scores": "nme",
               "states": [{"top1": 80.0, "variants": {"cnn": {"top1": 79.0}}},
                          {"top1": 70.0, "variants": {"cnn": {"top1": 69.0}}},
                          {"top1": 60.0, "variants": {"cnn": {"top1": 59.0}}}],
               "accuracy_matrix": [[80.0], [72.0, 50.0], [64.0, 40.0, 30.0]]}
    base = {"title": "t", "venue": "v", "table": "T", "value": 50.0, "source": "s", "classifier": "nme"}
    tasks = PaperTarget.model_validate({**base, "state_accuracy": "mean_over_tasks"})
    assert run_figure(results, tasks) == pytest.approx((80.0 + 61.0 + 134.0 / 3) / 3)
    assert run_figure(results, PaperTarget.model_validate(base)) == pytest.approx(70.0)
    other = PaperTarget.model_validate({**base, "classifier": "cnn", "state_accuracy": "mean_over_tasks"})
    assert run_figure(results, other) is None and "accuracy matrix" in (why_no_figure(results, other) or "")


def write_cifar100(root, train_per_class: int, test_per_class: int) -> None:
    """A CIFAR-100-format folder (``cifar-100-python/{train,test,meta}``) of 100 classes, the
    training images interleaved in file order as the real file's are."""
    import pickle

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rs = np.random.RandomState(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = cifar_like_labels(per_class, 100, seed=1).tolist()
        data = rs.randint(0, 256, (len(labels), 3072)).astype(np.uint8)
        (folder / split).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))


def test_the_lt_cil_paper_config_is_one_command_and_prints_the_paper_figure(tmp_path, capsys):
    """Issue 38 item 9: ``cilkit run lt-cifar100-ordered-b50-10steps --set data.root=DIR`` runs on
    CIFAR-100's files (here a tiny copy in the real format, two states and one epoch of each stage),
    keeps the authors' per-class counts, and puts the paper's 45.73 beside the run."""
    import json

    from cilkit.cli import main

    write_cifar100(tmp_path / "data", train_per_class=20, test_per_class=2)
    out = tmp_path / "run"
    assert main(["run", "lt-cifar100-ordered-b50-10steps", "--set", f"data.root={tmp_path / 'data'}",
                 "--set", "train.epochs=1", "--set", "lt2stage.epochs=1", "--set", "lucir.cbf=false",
                 "--set", "scenario.states=2", "--set", "threads=1", "--set", "state0_cache=null",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    counts = results["imbalance"]["train_per_class"]  # by position; the ordered order is the label order
    assert counts == [max(1, int(20 * 0.01 ** (c / 99))) for c in range(55)]
    assert len(results["states"]) == 2 and "few_shot_top1" in results["states"][1]
    assert "45.73" in (out / "report" / "table.md").read_text()
    capsys.readouterr()


def test_a_wrapper_run_with_two_bases_is_labelled_by_the_option_that_differs(tmp_path):
    """Issue 38 item 8: ``lt2stage`` over ``lucir`` and over ``eeil`` on one protocol are two rows
    named by their base (``lt2stage (base=eeil)``), not by a run directory; twins whose options
    are the same keep the directory."""
    from cilkit.analysis.runsets import FoundRun, _labels

    def found(name: str) -> list:
        return [(FoundRun(name, tmp_path / name, {}), 0)]

    groups = [("lt2stage", 1, found("a")), ("lt2stage", 1, found("b")), ("lucir", 1, found("c"))]
    options = ['{"base": "lucir", "epochs": 1}', '{"base": "eeil", "epochs": 1}', '{"lambda_base": 1.0}']
    assert _labels(groups, False, options) == ["lt2stage (base=lucir)", "lt2stage (base=eeil)", "lucir"]
    same = ['{"base": "eeil"}', '{"base": "eeil"}', "{}"]
    assert _labels(groups, False, same)[:2] == [f"lt2stage ({tmp_path / 'a'})", f"lt2stage ({tmp_path / 'b'})"]
