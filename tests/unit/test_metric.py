# SPDX-License-Identifier: Apache-2.0
"""Tests of diadm.metric.ImageRetrievalScore against the functional API and a float64 brute-force reference."""

import io
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

from diadm._imports import MATPLOTLIB_AVAILABLE, SKLEARN_AVAILABLE
from diadm.estimator import estimate_irs
from diadm.functional import image_retrieval_score
from diadm.metric import ImageRetrievalScore, _communication_device, _count_duplicate_rows, _gather_states

SCORE_KEYS = ("irs_alpha", "irs_inf", "irs_inf_lower", "irs_inf_upper")
COUNT_KEYS = ("n_train", "n_samples", "n_learned")


def _clustered_features(num_train: int = 120, num_generated: int = 90, num_held_out: int = 60, width: int = 16):
    """Training features, generated ones near a third of them (poor coverage), held-out ones near any of them."""
    generator = torch.Generator().manual_seed(7)
    train = torch.randn(num_train, width, generator=generator)
    generated = train[torch.randint(0, num_train // 3, (num_generated,), generator=generator)]
    generated = generated + 0.05 * torch.randn(num_generated, width, generator=generator)
    held_out = train[torch.randint(0, num_train, (num_held_out,), generator=generator)]
    held_out = held_out + 0.05 * torch.randn(num_held_out, width, generator=generator)
    return train, generated, held_out


def _filled_metric(train, generated, held_out=None, batch_size: int = 32, **kwargs) -> ImageRetrievalScore:
    metric = ImageRetrievalScore(feature=None, **kwargs)
    for rows, flags in ((train, {"real": True}), (held_out, {"real": True, "held_out": True}), (generated, {})):
        if rows is None:
            continue
        for batch in rows.split(batch_size):
            metric.update_features(batch, real=flags.get("real", False), held_out=flags.get("held_out", False))
    return metric


def _values(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in scores.items()}


class _TinyConvNet(nn.Module):
    """A small seeded random conv net: (N, 1, 8, 8) images in [0, 1] -> (N, 64) features."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.body(imgs)


# ------------------------------------------------------------------------------------------------ class contract
def test_class_flags_match_torchmetrics_conventions():
    assert ImageRetrievalScore.higher_is_better is True
    assert ImageRetrievalScore.is_differentiable is False
    assert ImageRetrievalScore.full_state_update is False
    assert (ImageRetrievalScore.plot_lower_bound, ImageRetrievalScore.plot_upper_bound) == (0.0, 1.0)
    metric = ImageRetrievalScore(feature=None)
    assert metric._reductions == {name: metric._reductions[name] for name in metric._defaults}
    assert sorted(metric._defaults) == sorted(
        f"{kind}_{what}" for kind in ("train", "held_out", "generated") for what in ("features", "indices")
    )
    assert all(default == [] for default in metric._defaults.values())


# ------------------------------------------------------------------------------------------- values vs reference
def test_compute_equals_functional_on_same_features():
    train, generated, held_out = _clustered_features()
    metric = _filled_metric(train, generated, held_out, batch_size=25)
    scores = metric.compute()
    reference = image_retrieval_score(train, generated, held_out)
    for key in SCORE_KEYS:
        assert scores[key].item() == pytest.approx(getattr(reference.synthetic, key), abs=1e-7), key
    for key in COUNT_KEYS:
        assert scores[key].dtype == torch.int64
        assert scores[key].item() == getattr(reference.synthetic, key), key
    assert scores["irs_adjusted"].item() == pytest.approx(reference.irs_adjusted, abs=1e-6)
    assert scores["irs_adjusted_std"].item() == pytest.approx(reference.irs_adjusted_std, abs=1e-6)
    assert torch.equal(metric.last_result.nearest_train_index, reference.nearest_train_index)
    assert torch.equal(metric.last_result.retrieval_counts, reference.retrieval_counts)


def test_compute_equals_float64_brute_force_and_estimator():
    # independent path: scipy float64 distances -> k -> estimate_irs; the metric must give the same numbers
    train, generated, _ = _clustered_features()
    scores = _filled_metric(train, generated).compute()
    nearest = cdist(generated.double().numpy(), train.double().numpy(), "sqeuclidean").argmin(axis=1)
    k = len(np.unique(nearest))
    expected = estimate_irs(train.shape[0], generated.shape[0], k)
    assert scores["n_learned"].item() == k
    assert scores["irs_alpha"].item() == pytest.approx(k / train.shape[0], abs=1e-7)
    for key in SCORE_KEYS:
        assert scores[key].item() == pytest.approx(getattr(expected, key), abs=1e-7), key
    # no held-out images: no adjusted score
    assert "irs_adjusted" not in scores
    assert "irs_adjusted_std" not in scores


def test_several_held_out_subsets_report_the_spread():
    train, generated, held_out = _clustered_features(num_generated=90, num_held_out=30)
    scores = _filled_metric(train, generated, held_out).compute()
    reference = image_retrieval_score(train, generated, held_out)
    assert reference.num_subsets == 3
    assert scores["irs_adjusted_std"].item() == pytest.approx(reference.irs_adjusted_std, abs=1e-6)


@pytest.mark.parametrize("batch_sizes", [(1, 7, 200), (50, 13, 3)], ids=["small-first", "mixed"])
def test_batched_accumulation_equals_one_shot(batch_sizes):
    train, generated, held_out = _clustered_features()
    one_shot = _filled_metric(train, generated, held_out, batch_size=10_000).compute()
    metric = ImageRetrievalScore(feature=None)
    for rows, real, held in ((train, True, False), (generated, False, False), (held_out, True, True)):
        start, turn = 0, 0
        while start < rows.shape[0]:
            stop = start + batch_sizes[turn % len(batch_sizes)]
            metric.update_features(rows[start:stop], real=real, held_out=held)
            start, turn = stop, turn + 1
    assert _values(metric.compute()) == _values(one_shot)


def test_update_features_copies_the_callers_buffer():
    buffer = torch.randn(4, 3)
    metric = ImageRetrievalScore(feature=None)
    metric.update_features(buffer, real=True)
    expected = buffer.clone()
    buffer.zero_()
    assert torch.equal(metric.train_features[0], expected)


def test_update_with_pixel_features_equals_precomputed_pixels():
    imgs = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8)
    generated = imgs[:20].clone()
    generated[:, :, 0, 0] = 0
    metric = ImageRetrievalScore(feature="pixels")
    for batch in imgs.split(16):
        metric.update(batch, real=True)
    metric.update(generated, real=False)
    # the pixel features, computed independently: scaled to [0, 1] and flattened
    direct = image_retrieval_score(imgs.reshape(60, -1).double() / 255, generated.reshape(20, -1).double() / 255)
    scores = metric.compute()
    assert scores["n_learned"].item() == direct.synthetic.n_learned == 20
    assert torch.equal(metric.last_result.nearest_train_index, direct.nearest_train_index)


def test_normalize_true_takes_float_images_and_gives_the_same_features():
    imgs = torch.randint(0, 256, (30, 3, 4, 4), dtype=torch.uint8)
    as_uint8 = ImageRetrievalScore(feature="pixels")
    as_float = ImageRetrievalScore(feature="pixels", normalize=True)
    as_uint8.update(imgs, real=True)
    as_float.update(imgs.float() / 255, real=True)
    assert torch.equal(as_uint8.train_features[0], as_float.train_features[0])


def test_grayscale_is_accepted_by_a_grayscale_extractor():
    # the pixel extractor with grayscale=True takes RGB and grayscale images alike
    metric = ImageRetrievalScore(feature="pixels", feature_kwargs={"size": 4, "grayscale": True})
    metric.update(torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8), real=True)
    metric.update(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8), real=False)
    assert metric.compute()["n_samples"].item() == 5
    assert metric.train_features[0].shape == (5, 16)


def test_grayscale_is_repeated_to_rgb_by_an_rgb_extractor():
    # SwAV's ResNet-50 (random weights, small resize) needs RGB: a grayscale batch must give the features of the same
    # images with the channel repeated, so each repeated copy retrieves its own grayscale original
    metric = ImageRetrievalScore(feature="swav", feature_kwargs={"pretrained": False, "size": 32})
    gray = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    metric.update(gray, real=True)
    metric.update(gray.repeat(1, 3, 1, 1), real=False)
    torch.testing.assert_close(metric.generated_features[0], metric.train_features[0], rtol=0, atol=1e-5)
    assert metric.compute()["n_learned"].item() == 6
    assert metric.last_result.nearest_train_index.tolist() == list(range(6))


def test_user_module_is_a_submodule_and_its_features_are_used():
    net = _TinyConvNet()
    metric = ImageRetrievalScore(feature=net)
    imgs = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    metric.update(imgs, real=True)
    with torch.no_grad():
        expected = net(imgs.float() / 255)
    torch.testing.assert_close(metric.train_features[0], expected, rtol=0, atol=0)
    assert any(module is net for module in metric.modules())


def test_user_module_moves_with_the_metric():
    net = _TinyConvNet()
    metric = ImageRetrievalScore(feature=net)
    metric.to("meta")
    assert next(net.parameters()).device.type == "meta"
    assert metric.device.type == "meta"


def test_metric_cast_to_another_dtype_still_updates():
    # `.to(dtype)` (as Lightning's "bf16-true" precision does) casts the extractor's weights; the extractor feeds
    # them inputs of their dtype, and the stored rows keep `feature_dtype`
    net = _TinyConvNet()
    imgs = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        expected = net.to(torch.float64)((imgs.float() / 255).double()).float()
    metric = ImageRetrievalScore(feature=net).to(torch.float64)
    metric.update(imgs, real=True)
    assert metric.train_features[0].dtype == torch.float32
    torch.testing.assert_close(metric.train_features[0], expected, rtol=0, atol=0)


def test_set_dtype_keeps_the_rows_and_indices_and_runs_the_extractor_in_that_dtype():
    net = _TinyConvNet()
    imgs = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    metric = ImageRetrievalScore(feature=net, feature_dtype=torch.float16)
    metric.update(imgs, real=True, indices=torch.arange(6))
    before = metric.train_features[0].clone()
    metric.set_dtype(torch.float64)
    assert next(net.parameters()).dtype == torch.float64
    assert metric.train_features[0].dtype == torch.float16
    assert torch.equal(metric.train_features[0], before)
    assert metric.train_indices[0].dtype == torch.int64
    metric.update(imgs, real=False, indices=torch.arange(6))
    assert metric.generated_features[0].dtype == torch.float16
    scores = metric.compute()
    assert (scores["n_learned"].item(), metric.last_result.nearest_train_index.tolist()) == (6, list(range(6)))


def test_plain_callable_as_feature():
    metric = ImageRetrievalScore(feature=lambda imgs: imgs.flatten(1) * 2, feature_kwargs={"num_features": 16})
    imgs = torch.full((3, 1, 4, 4), 255, dtype=torch.uint8)
    metric.update(imgs, real=True)
    assert torch.equal(metric.train_features[0], torch.full((3, 16), 2.0))


# ------------------------------------------------------------------------------------------------------- reset
def test_reset_with_reset_real_features_true_drops_everything():
    train, generated, _ = _clustered_features()
    metric = _filled_metric(train, generated)
    metric.compute()
    metric.reset()
    assert metric.train_features == []
    assert metric.generated_features == []
    assert metric._reference_index is None
    metric.update_features(generated, real=False)
    with pytest.raises(RuntimeError, match=re.escape("got 0 real training, 0 real held-out, 90 generated")):
        metric.compute()


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric ImageRetrievalScore was called before")
def test_reset_keeps_real_features_and_index_when_asked():
    train, generated, held_out = _clustered_features()
    metric = _filled_metric(train, generated, held_out, reset_real_features=False)
    first = metric.compute()
    index = metric._reference_index
    metric.reset()
    assert metric.generated_features == []
    with pytest.raises(RuntimeError, match=re.escape("got 120 real training, 60 real held-out, 0 generated")):
        metric.compute()
    metric.update_features(generated[:45], real=False)
    metric.update_features(generated[45:], real=False)
    again = metric.compute()
    assert _values(again) == _values(first)
    # the reference index was reused, not rebuilt
    assert metric._reference_index is index
    # adding training rows invalidates it
    metric.update_features(torch.randn(3, 16), real=True)
    assert metric.compute()["n_train"].item() == 123
    assert metric._reference_index is not index


def test_index_is_rebuilt_after_moving_or_loading():
    train, generated, _ = _clustered_features()
    metric = _filled_metric(train, generated, reset_real_features=False)
    metric.compute()
    metric.to(torch.device("cpu"))
    assert metric._reference_index is None


# ---------------------------------------------------------------------------------------------- float16 storage
def _digits_features() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    digits = load_digits()
    imgs = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    with torch.no_grad():
        conv = _TinyConvNet()(imgs)
    pca = torch.from_numpy(PCA(32, random_state=0).fit_transform(digits.data)).float()
    return {"conv": conv, "pca": pca}


@pytest.mark.skipif(not SKLEARN_AVAILABLE, reason="needs scikit-learn's bundled digits")
@pytest.mark.parametrize(
    ("name", "measured"), [pytest.param("conv", 4, id="random-conv-net"), pytest.param("pca", 0, id="pca-32")]
)
def test_float16_storage_changes_few_neighbours(name, measured):
    features = _digits_features()[name]
    train, queries = features[:900], features[900:]
    full = _filled_metric(train, queries, batch_size=300)
    half = _filled_metric(train, queries, batch_size=300, feature_dtype=torch.float16)
    full_scores, half_scores = full.compute(), half.compute()
    assert half.train_features[0].dtype == torch.float16
    assert half.train_features[0].element_size() * 2 == full.train_features[0].element_size()
    changed = full.last_result.nearest_train_index != half.last_result.nearest_train_index
    # measured on this machine: 4 of 897 queries (conv net) and 0 of 897 (PCA) change their nearest training image;
    # the bound leaves room for BLAS differences between machines
    assert int(changed.sum()) <= 2 * measured
    # every change is a near-tie: the two best float64 distances lie within 2^-9 (relative) of each other
    distances = torch.cdist(queries.double(), train.double()).square().sort(dim=1).values
    relative_gap = (distances[:, 1] - distances[:, 0]) / distances[:, 0]
    assert bool((relative_gap[changed] < 2**-9).all())
    # and the score does not move: k (hence every estimate) is within one image
    assert abs(full_scores["n_learned"].item() - half_scores["n_learned"].item()) <= 1
    # the stored values are the float16 roundings, within float16's relative precision
    torch.testing.assert_close(half.train_features[0].float(), train, rtol=2**-11, atol=1e-7)


def test_float16_storage_refuses_values_it_cannot_hold():
    metric = ImageRetrievalScore(feature=None, feature_dtype=torch.float16)
    with pytest.raises(ValueError, match=re.escape("`features` must fit float16 storage (|x| <= 65504), got values")):
        metric.update_features(torch.full((2, 3), 1e5), real=True)


# -------------------------------------------------------------------------------------------------- round trips
def _computed_pair():
    train, generated, held_out = _clustered_features()
    metric = _filled_metric(train, generated, held_out)
    return metric, _values(metric.compute())


def test_state_dict_round_trip_gives_the_same_value():
    metric, expected = _computed_pair()
    metric.persistent(True)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = ImageRetrievalScore(feature=None)
    restored.load_state_dict(state)
    assert restored.train_features[0].shape == (120, 16)
    with warnings.catch_warnings():
        # restored rows count as updates: no "compute before update" warning from torchmetrics
        warnings.simplefilter("error")
        assert _values(restored.compute()) == expected
    # a metric that already computed a value of its own: the load must replace the rows and the cached value
    used = _filled_metric(torch.randn(30, 16), torch.randn(20, 16))
    assert used.compute()["n_train"].item() == 30
    used.load_state_dict(state)
    assert _values(used.compute()) == expected


def test_loading_an_empty_state_dict_still_warns_and_refuses():
    empty = ImageRetrievalScore(feature=None)
    empty.persistent(True)
    restored = ImageRetrievalScore(feature=None)
    restored.load_state_dict(empty.state_dict())
    with (
        pytest.warns(UserWarning, match=re.escape("was called before the ``update`` method")),
        pytest.raises(RuntimeError, match=re.escape("got 0 real training, 0 real held-out, 0 generated")),
    ):
        restored.compute()


def test_pickle_and_clone_round_trips_give_the_same_value():
    metric, expected = _computed_pair()
    assert metric._reference_index is not None
    restored = pickle.loads(pickle.dumps(metric))
    assert restored._reference_index is None  # a faiss index is never pickled; it is rebuilt
    assert _values(restored.compute()) == expected
    clone = metric.clone()
    clone.update_features(torch.randn(5, 16), real=False)
    assert _values(clone.compute())["n_samples"] == 95
    assert _values(metric.compute()) == expected


def test_forward_accumulates_and_returns_none():
    imgs = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    pixels = ImageRetrievalScore(feature="pixels")
    assert pixels(imgs, real=True) is None
    assert pixels.train_features[0].shape == (4, 64)


# ------------------------------------------------------------------------------------------- duplicates, indices
def _single_rank_sync(tensor, group=None):
    """A stand-in for the gather of a one-process group: the metric then runs its post-gather checks."""
    return [tensor]


def _synced_metric(**kwargs) -> ImageRetrievalScore:
    return ImageRetrievalScore(
        feature=None, dist_sync_fn=_single_rank_sync, distributed_available_fn=lambda: True, **kwargs
    )


def test_exact_duplicate_rows_without_indices_warn_once():
    train, generated, _ = _clustered_features()
    metric = _synced_metric()
    metric.update_features(train, real=True)
    metric.update_features(train[:2], real=True)  # as a DistributedSampler pads an uneven split
    metric.update_features(generated, real=False)
    with pytest.warns(UserWarning, match=re.escape("2 of 122 real training feature rows are exact copies")) as record:
        scores = metric.compute()
    assert record[0].filename == __file__  # the warning points at the caller
    assert scores["n_train"].item() == 122  # detected and reported, not removed
    metric.update_features(torch.randn(1, 16), real=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()


def test_duplicate_generated_rows_name_the_seed():
    train, generated, _ = _clustered_features()
    metric = _synced_metric()
    metric.update_features(train, real=True)
    metric.update_features(torch.cat([generated, generated]), real=False)
    with pytest.warns(UserWarning, match=re.escape("seed each one differently (for example seed + rank)")):
        metric.compute()


def test_one_process_skips_the_duplicate_check():
    train, generated, _ = _clustered_features()
    metric = ImageRetrievalScore(feature=None)
    metric.update_features(torch.cat([train, train[:2]]), real=True)
    metric.update_features(generated, real=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metric.compute()["n_train"].item() == 122


def test_indices_remove_repeated_rows_and_restore_index_order():
    train, generated, held_out = _clustered_features()
    expected = _values(_filled_metric(train, generated, held_out).compute())
    order = torch.randperm(120)
    padded = torch.cat([order, order[:3]])  # three repeats, in a shuffled order
    metric = ImageRetrievalScore(feature=None)
    for part in padded.split(50):
        metric.update_features(train[part], real=True, indices=part)
    metric.update_features(held_out, real=True, held_out=True, indices=torch.arange(60))
    metric.update_features(generated, real=False, indices=list(range(90)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _values(metric.compute()) == expected


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param(torch.arange(12.0).reshape(4, 3), 0, id="distinct"),
        pytest.param(torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [2.0, 1.0]]), 2, id="triple"),
        # same sum of bits and same probed columns, different rows: the exact check must tell them apart
        pytest.param(torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 1.0, 3.0, 4.0]]), 0, id="collision"),
        pytest.param(torch.ones(3, 2, dtype=torch.float16), 2, id="float16"),
        pytest.param(torch.ones(1, 2), 0, id="one-row"),
        pytest.param(torch.ones(3, 2, dtype=torch.bfloat16), 2, id="bfloat16"),
        pytest.param(torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64), 1, id="float64"),
    ],
)
def test_count_duplicate_rows(rows, expected):
    assert _count_duplicate_rows(rows) == expected


def test_indices_from_only_some_processes_are_refused():
    # a stand-in for two ranks where the second passed no `indices`: its rows arrive, its indices do not
    def sync(tensor, group=None):
        return [tensor] if tensor.dtype == torch.int64 else [tensor, tensor]

    metric = ImageRetrievalScore(feature=None, dist_sync_fn=sync, distributed_available_fn=lambda: True)
    metric.update_features(torch.randn(5, 3), real=True, indices=torch.arange(5))
    metric.update_features(torch.randn(4, 3), real=False)
    message = (
        "`indices` were passed for 5 of 10 real training rows: some processes (or updates) passed `indices` and"
        " others did not; pass them everywhere or nowhere."
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        metric.compute()


def test_gather_refuses_states_of_another_width(monkeypatch):
    # two ranks whose extractors disagree: the header exchange must catch it before the rows are gathered
    def all_gather(out, header, group=None):
        out[0].copy_(header)
        out[1].copy_(header + torch.tensor([0, 0, 1, 0]))

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    message = (
        "`ImageRetrievalScore` states differ between processes (2-D torch.float32 of width 4, 2-D torch.float32 of"
        " width 5); every process must use the same feature extractor and `feature_dtype`."
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _gather_states(torch.randn(3, 4), group="fake-group")


def test_nccl_gathers_through_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert _communication_device(None, torch.device("cpu")) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert _communication_device(None, torch.device("cpu")) == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------- plot
@pytest.mark.skipif(not MATPLOTLIB_AVAILABLE, reason="plot needs matplotlib")
def test_plot_returns_a_figure_for_one_value_and_a_sequence():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    metric, _ = _computed_pair()
    fig, ax = metric.plot()
    assert isinstance(fig, Figure)
    labels = {line.get_label() for line in ax.get_lines()}
    assert set(SCORE_KEYS) <= labels
    assert "n_train" not in labels
    fig_seq, ax_seq = metric.plot([metric.compute(), metric.compute()])
    assert isinstance(fig_seq, Figure)
    assert ax_seq.get_xlabel() == "Step"
    # an adjusted score above 1 must stay on the axis
    _, ax_big = metric.plot({"irs_inf": torch.tensor(0.5), "irs_adjusted": torch.tensor(1.6)})
    assert ax_big.get_ylim()[1] > 1.6
    plt.close("all")


def test_plot_without_matplotlib_names_both_install_commands(monkeypatch):
    import diadm.metric

    metric, _ = _computed_pair()
    monkeypatch.setattr(diadm.metric, "MATPLOTLIB_AVAILABLE", False)
    message = (
        "`ImageRetrievalScore.plot` needs `matplotlib`, which is not installed. Install it with"
        " `pip install 'diadm[demo]'` or `pip install matplotlib`."
    )
    with pytest.raises(ModuleNotFoundError, match=re.escape(message)):
        metric.plot()


# ------------------------------------------------------------------------------------------------------ errors
_IMAGE_ERRORS = [
    pytest.param(
        {},
        torch.zeros(8, 8, dtype=torch.uint8),
        ValueError,
        "`imgs` must be a 4-D batch of shape (N, C, H, W), got shape (8, 8) and dtype torch.uint8.",
        id="rank2",
    ),
    pytest.param(
        {},
        torch.zeros(1, 8, 8, dtype=torch.uint8),
        ValueError,
        "got shape (1, 8, 8) and dtype torch.uint8; add a batch dimension with `imgs.unsqueeze(0)`.",
        id="rank3",
    ),
    pytest.param(
        {},
        torch.zeros(2, 4, 8, 8, dtype=torch.uint8),
        ValueError,
        "`imgs` must have 1 (grayscale) or 3 (RGB) channels in dimension 1, got shape (2, 4, 8, 8)",
        id="four-channels",
    ),
    pytest.param(
        {},
        torch.zeros(0, 1, 8, 8, dtype=torch.uint8),
        ValueError,
        "`imgs` must hold at least one image, got shape (0, 1, 8, 8)",
        id="empty",
    ),
    pytest.param(
        {},
        torch.rand(2, 1, 8, 8),
        TypeError,
        "`imgs` must be uint8 in [0, 255] because `normalize=False`, got shape (2, 1, 8, 8) and dtype torch.float32;"
        " set `normalize=True` for float images in [0, 1]",
        id="float-without-normalize",
    ),
    pytest.param(
        {"normalize": True},
        torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
        TypeError,
        "`imgs` must be floating in [0, 1] because `normalize=True`, got shape (2, 1, 8, 8) and dtype torch.uint8;"
        " set `normalize=False` for uint8 images in [0, 255].",
        id="uint8-with-normalize",
    ),
    pytest.param(
        {"normalize": True},
        torch.full((2, 1, 8, 8), 255.0),
        ValueError,
        "`imgs` must have values in [0, 1] because `normalize=True`, got values in [255, 255]",
        id="float-out-of-range",
    ),
    pytest.param(
        {"normalize": True},
        torch.zeros(2, 1, 8, 8, dtype=torch.int32),
        TypeError,
        "`imgs` must be floating in [0, 1] because `normalize=True`, got shape (2, 1, 8, 8) and dtype torch.int32.",
        id="int-with-normalize",
    ),
    pytest.param({}, [[0]], TypeError, "`imgs` must be a torch.Tensor of shape (N, C, H, W), got list.", id="list"),
]


@pytest.mark.parametrize(("options", "imgs", "error", "message"), _IMAGE_ERRORS)
def test_bad_images_are_refused(options, imgs, error, message):
    metric = ImageRetrievalScore(feature="pixels", **options)
    with pytest.raises(error, match=re.escape(message)):
        metric.update(imgs, real=True)


def test_held_out_needs_real():
    metric = ImageRetrievalScore(feature=None)
    with pytest.raises(ValueError, match=re.escape("`held_out=True` marks real held-out images, so it needs")):
        metric.update_features(torch.randn(2, 3), real=False, held_out=True)
    with pytest.raises(TypeError, match=re.escape("`real` must be a bool, got tensor(True) (Tensor).")):
        metric.update_features(torch.randn(2, 3), real=torch.tensor(True))


def test_feature_width_must_not_change():
    metric = ImageRetrievalScore(feature=None)
    metric.update_features(torch.randn(4, 8), real=True)
    with pytest.raises(
        ValueError, match=re.escape("`features` must have 8 values per row like the earlier updates, got shape (3, 5)")
    ):
        metric.update_features(torch.randn(3, 5), real=False)
    pixels = ImageRetrievalScore(feature="pixels", feature_kwargs={"size": 4, "grayscale": True})
    with pytest.raises(ValueError, match=re.escape("must have 16 values per row like the earlier updates")):
        pixels.update_features(torch.randn(3, 5), real=True)


def test_compute_before_any_update_raises_after_torchmetrics_warning():
    metric = ImageRetrievalScore(feature=None)
    expected = (
        "`ImageRetrievalScore.compute()` needs at least one real training and one generated image, got 0 real"
        " training, 0 real held-out, 0 generated; add real training images (`real=True`) with `update` or"
        " `update_features` first."
    )
    with (
        pytest.warns(UserWarning, match=re.escape("was called before the ``update`` method")),
        pytest.raises(RuntimeError, match=re.escape(expected)),
    ):
        metric.compute()


def test_compute_before_real_or_generated_images():
    metric = ImageRetrievalScore(feature=None)
    metric.update_features(torch.randn(4, 8), real=False)
    with pytest.raises(RuntimeError, match=re.escape("add real training images (`real=True`)")):
        metric.compute()
    other = ImageRetrievalScore(feature=None)
    other.update_features(torch.randn(4, 8), real=True)
    with pytest.raises(RuntimeError, match=re.escape("add generated images (`real=False`) with `update`")):
        other.compute()


def test_update_without_extractor():
    metric = ImageRetrievalScore(feature=None)
    with pytest.raises(RuntimeError, match=re.escape("built with `feature=None`; pass precomputed features")):
        metric.update(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), real=True)


def test_indices_must_be_consistent():
    metric = ImageRetrievalScore(feature=None)
    metric.update_features(torch.randn(4, 8), real=True, indices=torch.arange(4))
    with pytest.raises(ValueError, match=re.escape("earlier updates came with `indices`, this one without")):
        metric.update_features(torch.randn(4, 8), real=True)
    with pytest.raises(ValueError, match=re.escape("one dataset index per image (4), got dtype torch.float32")):
        metric.update_features(torch.randn(4, 8), real=True, indices=torch.zeros(4))
    with pytest.raises(ValueError, match=re.escape("got dtype torch.int64 and shape (3,).")):
        metric.update_features(torch.randn(4, 8), real=True, indices=torch.arange(3))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param(
            {"reset_real_features": 1}, TypeError, "`reset_real_features` must be a bool, got 1 (int).", id="r"
        ),
        pytest.param({"normalize": "yes"}, TypeError, "`normalize` must be a bool, got 'yes' (str).", id="normalize"),
        pytest.param({"alpha_e": 0.7}, ValueError, "`alpha_e` must lie in the open interval (0, 0.5), got 0.7", id="a"),
        pytest.param({"seed": 1.5}, TypeError, "`seed` must be an int, got 1.5 (float).", id="seed"),
        pytest.param(
            {"feature_dtype": torch.bfloat16},
            ValueError,
            "`feature_dtype` must be torch.float32 or torch.float16, got torch.bfloat16;",
            id="dtype",
        ),
        pytest.param({"backend": "annoy"}, ValueError, "`backend` must be one of ('auto', 'faiss', 'torch')", id="b"),
        pytest.param({"max_memory_bytes": 0}, ValueError, "`max_memory_bytes` must be a positive int, got 0", id="m"),
        pytest.param(
            {"max_memory_bytes": 1.5e6},
            TypeError,
            "`max_memory_bytes` must be a positive int, got 1500000.0 (float); the default is 268435456.",
            id="m-float",
        ),
        pytest.param(
            {"alpha_e": "0.05"}, ValueError, "`alpha_e` must be a float in (0, 0.5), got '0.05' (str)", id="a-str"
        ),
        pytest.param(
            {"features_on_cpu": 1}, TypeError, "`features_on_cpu` must be a bool, got 1 (int).", id="features-on-cpu"
        ),
        pytest.param(
            {"feature": 3},
            TypeError,
            "`feature` must be an extractor name (str), an nn.Module or a callable, got int.",
            id="feature-int",
        ),
        pytest.param(
            {"feature_kwargs": {"size": 4}},
            ValueError,
            "`weights` and `feature_kwargs` configure a feature extractor, but `feature` is None",
            id="kwargs-without-feature",
        ),
    ],
)
def test_bad_constructor_arguments(options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ImageRetrievalScore(**{"feature": None, **options})


def test_unknown_feature_name_is_refused():
    with pytest.raises(ValueError, match=re.escape("`feature` must be one of")):
        ImageRetrievalScore(feature="resnet9000")


def _indexed_metric(train, generated, held_out, offsets) -> ImageRetrievalScore:
    metric = ImageRetrievalScore(feature=None)
    for rows, start, flags in (
        (train, offsets[0], {"real": True}),
        (held_out, offsets[1], {"real": True, "held_out": True}),
        (generated, offsets[2], {"real": False}),
    ):
        metric.update_features(rows, indices=torch.arange(start, start + rows.shape[0]), **flags)
    return metric


def test_merge_state_equals_one_metric_and_drops_the_cached_index():
    train, generated, held_out = _clustered_features()
    expected = _values(_filled_metric(train, generated, held_out).compute())
    first = _indexed_metric(train[:70], generated[:40], held_out[:30], (0, 0, 0))
    first.compute()
    # merged rows come first, so only indices restore the order the seeded held-out subsample depends on
    first.merge_state(_indexed_metric(train[70:], generated[40:], held_out[30:], (70, 30, 40)))
    assert first._reference_index is None
    assert _values(first.compute()) == expected
    unordered = _filled_metric(train[:70], generated[:40], held_out[:30])
    unordered.merge_state(_filled_metric(train[70:], generated[40:], held_out[30:]))
    merged = _values(unordered.compute())
    assert {key: merged[key] for key in (*SCORE_KEYS, *COUNT_KEYS)} == {
        key: expected[key] for key in (*SCORE_KEYS, *COUNT_KEYS)
    }
