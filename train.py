"""The ALQ app: float pretraining (cached) or a given checkpoint, then ALQ, then test; writes results.json.

    python train.py                                          # experiment fmnist_lenet5 (a few CPU minutes)
    python train.py model=resnet18 alq.target_bits=0.7 experiment=smoke
    python train.py -m alq.target_bits=2,1,0.7,0.5,0.4,0.3   # accuracy vs bits, one job per target
    python train.py --cfg job                                # print the composed config

The app lives in :mod:`alq_lightning.app.train` (installed as the console script ``alq-train``); this file runs it
from a checkout.
"""
from __future__ import annotations

from alq_lightning.app.train import config_dir, main, measure_accuracy, run_token, say, train

__all__ = ["config_dir", "main", "measure_accuracy", "run_token", "say", "train"]

if __name__ == "__main__":
    main()
