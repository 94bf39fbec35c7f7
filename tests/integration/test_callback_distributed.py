# SPDX-License-Identifier: Apache-2.0
"""IRSCallback under two-process CPU DDP (gloo): split sampling, equal scores on every rank, pictures on rank 0."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diadm.estimator import estimate_irs

# Lightning's DDP launcher re-runs this script once per extra rank, so it is a file, not a pytest function.
SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from diadm.callback import IRSCallback

    OUT = Path(sys.argv[1])
    REAL = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))


    class Toy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return (self.weight - batch[0].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(REAL), batch_size=5, shuffle=True)


    class Recorder:
        def __init__(self):
            self.calls = []

        def __call__(self, pl_module, num_images, generator):
            seed = generator.initial_seed()
            picks = torch.randint(0, 20, (num_images,), generator=generator)  # reproduces half the training set
            images = REAL[picks]
            self.calls.append({"seed": seed, "images": images.tolist()})
            return images


    if __name__ == "__main__":
        fixed, precise = Recorder(), Recorder()
        callbacks = [
            IRSCallback(num_samples=11, sample_fn=fixed, feature="pixels", prefix="fixed/", num_images=4),
            IRSCallback(
                num_samples=5,
                sample_fn=precise,
                feature="pixels",
                prefix="ci/",
                target_ci_width=0.4,
                max_samples=60,
                log_images=False,
                compute_fid=False,
            ),
        ]
        pictures = []
        original = IRSCallback._log_pictures

        def counting(self, trainer, *args):
            pictures.append(self.prefix)
            return original(self, trainer, *args)

        IRSCallback._log_pictures = counting
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=1,
            callbacks=callbacks,
            logger=TensorBoardLogger(OUT, name="tb", version=0),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Toy())
        record = {
            "rank": trainer.global_rank,
            "fixed": {"history": callbacks[0].history, "calls": fixed.calls},
            "ci": {"history": callbacks[1].history, "calls": precise.calls},
            "pictures": pictures,
            "callback_metrics": {key: value.item() for key, value in trainer.callback_metrics.items()},
        }
        (OUT / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp(tmp_path):
    script = tmp_path / "ddp_irs.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    real = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0)).flatten(1).double()

    # Sampling is split 6 + 5 with distinct seeds (seed + rank).
    calls = [rank["fixed"]["calls"] for rank in ranks]
    assert [[len(call["images"]) for call in rank_calls] for rank_calls in calls] == [[6], [5]]
    assert [rank_calls[0]["seed"] for rank_calls in calls] == [0, 1]

    # Every rank computed the same scores, on the samples of both ranks in rank order.
    assert ranks[0]["fixed"]["history"] == ranks[1]["fixed"]["history"]
    images = torch.tensor(calls[0][0]["images"] + calls[1][0]["images"]).flatten(1).double()
    nearest = torch.cdist(images, real).argmin(dim=1)
    expected = estimate_irs(40, 11, nearest.unique().numel())
    entry = ranks[0]["fixed"]["history"][0]
    assert (entry["num_samples"], entry["n_learned"]) == (11, expected.n_learned)
    assert entry["irs_inf"] == pytest.approx(expected.irs_inf, abs=1e-12)
    assert ranks[1]["callback_metrics"]["fixed/irs_inf"] == pytest.approx(expected.irs_inf, abs=1e-6)

    # The precision loop takes the same decision on both ranks (no hang) and logs the count it used: replayed
    # here round by round (5 samples, 3 on rank 0 then 2 on rank 1), it stops at the first width below 0.4.
    assert ranks[0]["ci"]["history"] == ranks[1]["ci"]["history"]
    used = ranks[0]["ci"]["history"][0]["num_samples"]
    rounds = [r0["images"] + r1["images"] for r0, r1 in zip(*(rank["ci"]["calls"] for rank in ranks), strict=True)]
    assert [len(batch) for batch in rounds] == [5] * len(rounds)
    replayed = torch.tensor([image for batch in rounds for image in batch]).flatten(1).double()
    retrieved = torch.cdist(replayed, real).argmin(dim=1)
    expected_used = 60  # the cap, unless a round is narrow enough first
    for total in range(5, 60, 5):
        estimate = estimate_irs(40, total, retrieved[:total].unique().numel())
        if estimate.irs_inf_upper - estimate.irs_inf_lower < 0.4:
            expected_used = total
            break
    assert used == expected_used == replayed.shape[0]
    assert used > 5  # the first round alone is not precise enough: the loop did run

    # Scalars reach TensorBoard once (rank zero's logger), under Lightning's step: 40 images / 2 ranks / 5 per batch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("fixed/irs_inf")] == [
        (3, pytest.approx(expected.irs_inf, abs=1e-6))
    ]

    # Pictures only from rank zero (the second callback has them switched off).
    assert [rank["pictures"] for rank in ranks] == [["fixed/"], []]
