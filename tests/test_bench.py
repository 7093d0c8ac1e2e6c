"""``capsnet bench``'s epoch timing on the tiny data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from capsnet.tools.bench import bench_epoch
from capsnet.training.config import make_config


@pytest.mark.slow
def test_the_timed_epoch_trains_every_image_after_the_untimed_one(tiny_dataset: Path,
                                                                 one_thread) -> None:
    config = make_config("seed", dataset=str(tiny_dataset), batch_size=50, val_size=40,
                         device="cpu", eval_batch_size=100)
    result = bench_epoch(config, None)
    assert result["epoch_images"] == 200  # 240 training images less the 40 held out
    assert result["epoch_seconds"] > 0 and result["epoch_train_images_per_s"] > 0
