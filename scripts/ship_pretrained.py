"""Put a run's best model into the package as a shipped pretrained model, in half precision,
and measure the test accuracy of exactly the weights that ship.

    python scripts/ship_pretrained.py runs/seed-full mnist

writes src/capsnet/pretrained/NAME/{config.json, model.safetensors, summary.json}; summary.json
is the run's summary plus what was measured here with the shipped (float16) weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from capsnet import CapsNet
from capsnet.training.checkpoint import load_checkpoint, load_model
from capsnet.training.config import TrainConfig, splits_for
from capsnet.data.none_images import run_pool
from capsnet.training.evaluate import evaluate, none_rate
from capsnet.utils.device import device_name
from capsnet.utils.files import write_json

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "capsnet" / "pretrained"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    folder = PACKAGE / args.name
    model, payload = load_model(args.run_dir / "best.pt")
    model.save_pretrained(folder, dtype=torch.float16)
    shipped = CapsNet.from_pretrained(folder)
    config = TrainConfig.from_dict(payload["train_config"])
    test = evaluate(shipped, splits_for(config, args.data_dir).test,
                    batch_size=config.eval_batch_size,
                    reconstruction_weight=config.reconstruction_weight,
                    reduction=config.reconstruction_reduction, margin_form=config.margin_loss)
    # the images of no class a run with --none-fraction is tested on (drawn apart from its
    # training ones), measured for any model
    unseen = run_pool(shipped.config.image_size, shipped.config.in_channels, config.seed,
                      shipped.prepare == "mnist", "test")
    summary = json.loads((args.run_dir / "summary.json").read_text())
    summary["shipped"] = {
        "weights": "float16", "test_accuracy": test.accuracy, "test_loss": test.loss,
        "test_errors": test.total - round(test.accuracy * test.total),
        "test_none_rate": none_rate(shipped, unseen, batch_size=config.eval_batch_size),
        "epoch": load_checkpoint(args.run_dir / "best.pt")["progress"]["epoch"],
        "measured_on": device_name(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
        "command": f"python scripts/ship_pretrained.py {args.run_dir} {args.name}"}
    write_json(folder / "summary.json", summary)
    size = (folder / "model.safetensors").stat().st_size
    print(f"{folder}: {size / 1e6:.1f} MB; shipped weights: test accuracy {test.accuracy:.2%} "
          f"(run's float32 best.pt: {summary['test_accuracy']:.2%}); answers none for "
          f"{summary['shipped']['test_none_rate']:.1%} of {len(unseen)} images of no class")


if __name__ == "__main__":
    main()
