# SPDX-License-Identifier: Apache-2.0
"""`diadm demo`: the quick run end to end, its table against independent recomputation, and its helpers."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.datasets import load_digits
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diadm.cli import main
from diadm.demo import (
    FIGURES,
    QUICK_CONFIG,
    RESULTS_FILE,
    TABLE_FILE,
    DemoConfig,
    DemoRow,
    format_table,
    frechet_distance,
    load_digits_split,
)
from diadm.estimator import estimate_irs

NUMBER = r"(\d+\.\d+)"
ROW_PATTERN = re.compile(
    rf"^\| (baseline|diadm|diadm, i.i.d. features|held-out real) \| {NUMBER} \[{NUMBER}, {NUMBER}\]"
    rf" \| {NUMBER} \[{NUMBER}, {NUMBER}\] \| {NUMBER} \| (\d+) \| {NUMBER} \|$"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse_table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        match = ROW_PATTERN.match(line)
        if match:
            rows[match.group(1)] = [float(value) for value in match.groups()[1:]]
    return rows


@pytest.mark.slow
def test_demo_quick_writes_its_table_figures_and_runs(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = parse_table(printed)
    assert sorted(rows) == ["baseline", "diadm", "diadm, i.i.d. features", "held-out real"]
    assert f"Output folder: {out.resolve()}" in printed
    assert re.search(r"^Time taken: \d+\.\d s$", printed, flags=re.MULTILINE)
    assert (out / TABLE_FILE).read_text().strip() in printed

    for name, (adjusted, low, high, irs_inf, inf_low, inf_high, alpha, learned, frechet) in rows.items():
        assert low <= adjusted <= high, name
        assert inf_low <= irs_inf <= inf_high, name
        assert 0 < learned <= QUICK_CONFIG.num_held_out, name
        assert alpha == pytest.approx(learned / QUICK_CONFIG.num_train, abs=5e-4), name
        assert frechet >= 0, name
        # The printed IRS_inf follows from the printed counts through the estimator.
        estimate = estimate_irs(QUICK_CONFIG.num_train, QUICK_CONFIG.num_held_out, int(learned))
        assert irs_inf == pytest.approx(estimate.irs_inf, abs=5e-4), name
    assert rows["held-out real"][0] == 1.0

    # Independent check of the held-out row: brute-force float64 retrieval in pixel space, and scipy's Frechet.
    train, held_out = load_digits_split(QUICK_CONFIG.num_train, QUICK_CONFIG.num_held_out, seed=0)
    train_pixels = train.reshape(train.shape[0], -1).double().numpy()
    held_pixels = held_out.reshape(held_out.shape[0], -1).double().numpy()
    distances = ((held_pixels[:, None, :] - train_pixels[None, :, :]) ** 2).sum(axis=2)
    assert rows["held-out real"][7] == len(np.unique(distances.argmin(axis=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's sqrtm reports the digits' singular covariances
        reference_frechet = scipy_frechet(held_pixels, train_pixels)
    assert rows["held-out real"][8] == pytest.approx(reference_frechet, abs=1e-3)

    results = json.loads((out / RESULTS_FILE).read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["baseline", "diadm", "diadm, i.i.d. features", "held-out real"]
    for name, entries in results["history"].items():
        steps = [entry["global_step"] for entry in entries]
        assert steps == list(range(QUICK_CONFIG.eval_every, QUICK_CONFIG.num_steps + 1, QUICK_CONFIG.eval_every)), name
    for file_name in FIGURES.values():
        path = out / file_name
        if file_name.startswith("never_retrieved") and not path.exists():
            continue  # written only when a training image was missed
        assert path.read_bytes()[:8] == PNG_MAGIC, file_name
    for name in ("baseline", "diadm"):
        accumulator = EventAccumulator(str(out / "runs" / name))
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        assert {"irs/irs_adjusted", "irs/irs_inf", "irs/fid", "train/loss"} <= set(tags), name
        logged = accumulator.Scalars("irs/irs_inf")
        # One scalar per evaluation (Lightning files a value logged after step s under s - 1).
        assert len(logged) == len(steps)
        assert logged[-1].value == pytest.approx(results["history"][name][-1]["irs_inf"], abs=1e-6)
        assert (out / "pipelines" / name / "model_index.json").is_file()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class Passthrough(nn.Module):
    """Hands features to torchmetrics' FID unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def test_frechet_distance_matches_torchmetrics_and_scipy():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    b = (
        torch.randn(300, 6, generator=generator, dtype=torch.float64)
        @ torch.diag(torch.linspace(0.5, 2, 6, dtype=torch.float64))
        + 0.3
    )
    ours = frechet_distance(a, b)
    fid = FrechetInceptionDistance(feature=Passthrough(6))
    fid.update(a.float(), real=True)
    fid.update(b.float(), real=False)
    # torchmetrics accumulates float32 inputs in float64; scipy's sqrtm is the float64 reference (1e-6 apart).
    assert ours == pytest.approx(float(fid.compute()), abs=1e-4)
    assert ours == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), abs=1e-9)


def test_frechet_distance_is_quiet_and_right_for_singular_covariances():
    train, held_out = load_digits_split(500, 300, seed=1)
    a, b = train.reshape(500, -1).double().numpy(), held_out.reshape(300, -1).double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's sqrtm warns here that the matrix is singular; ours must not
        ours = frechet_distance(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = scipy_frechet(a, b)
    assert ours == pytest.approx(reference, abs=1e-6)


def test_frechet_distance_bad_input():
    with pytest.raises(
        ValueError, match=re.escape("`features_a` must have shape (N, D) with N >= 2, got shape (1, 3)")
    ):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=re.escape("must have the same width, got 3 and 2.")):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_digits_split_is_seeded_disjoint_and_scaled():
    train, held_out = load_digits_split(1000, 797, seed=0)
    again, _ = load_digits_split(1000, 797, seed=0)
    other, _ = load_digits_split(1000, 797, seed=1)
    assert torch.equal(train, again)
    assert not torch.equal(train, other)
    digits = torch.from_numpy(load_digits().images / 16.0).float().unsqueeze(1)
    order = np.random.default_rng(0).permutation(1797)
    assert torch.equal(train, digits[order[:1000]])
    assert torch.equal(held_out, digits[order[1000:]])
    assert float(train.min()) == 0.0
    assert float(train.max()) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_steps": 0}, "`num_steps` must be a positive integer, got 0."),
        ({"num_train": 1500, "num_held_out": 400}, "`num_train + num_held_out` must be at most the 1797 digits"),
        ({"eval_samples": 1}, "`eval_samples` must be at least 2, got 1."),
    ],
    ids=["steps", "too-many", "eval-samples"],
)
def test_demo_config_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DemoConfig(**kwargs)


def test_demo_cli_bad_steps_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_format_table_round_trips_through_the_parser():
    rows = [
        DemoRow("baseline", 0.8, 0.7, 0.9, 0.6, 0.5, 0.7, 0.3, 240, 0.25),
        DemoRow("held-out real", 1.0, 0.9, 1.1, 0.75, 0.7, 0.8, 0.35, 280, 0.05),
    ]
    parsed = parse_table(format_table(rows))
    assert parsed["baseline"] == [0.8, 0.7, 0.9, 0.6, 0.5, 0.7, 0.3, 240, 0.25]
    assert parsed["held-out real"][7] == 280
