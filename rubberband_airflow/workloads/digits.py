"""The example workload: an MLP classifying scikit-learn's handwritten digits (shipped in the package).

Six hyperparameters (``SEARCH_SPACE``); data-parallel with DistributedDataParallel when a trial
has more than one worker; every epoch seeded from the trial's seed and the epoch number, so a
trial resumed from its checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from rubberband_airflow.trainable import TrialContext

SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "loguniform", "low": 1e-3, "high": 0.5},
    "momentum": {"type": "uniform", "low": 0.0, "high": 0.95},
    "width": {"type": "choice", "values": [16, 32, 64, 128, 256]},
    "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "batch_size": {"type": "choice", "values": [16, 32, 64, 128]},
    "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
}
METRIC, MODE = "accuracy", "max"


@lru_cache(maxsize=1)
def _data():
    """Digits as float tensors: a fixed 80/20 train/validation split."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.tensor(np.random.default_rng(0).permutation(len(y)))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _model(width: int, dropout: float):
    from torch import nn

    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 10))


def train(ctx: TrialContext) -> None:
    """Train the digits MLP from ``ctx.start_epoch`` to ``ctx.stop_epoch``."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    cfg = ctx.config
    torch.manual_seed(ctx.seed)
    model = _model(int(cfg["width"]), float(cfg["dropout"])).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                          weight_decay=float(cfg["weight_decay"]))
    if ctx.start_epoch > 0:  # the worker checked the checkpoint was taken at start_epoch
        state = ctx.load_checkpoint()
        if state is None:
            raise RuntimeError(f"trial {ctx.trial_id} should resume at epoch {ctx.start_epoch} but has no checkpoint")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    net = model
    if ctx.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model)
    x_train, y_train, x_val, y_val = _data()
    data = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=ctx.seed)
    # The global batch is the configured one; each worker takes its share.
    loader = DataLoader(data, batch_size=max(1, int(cfg["batch_size"]) // ctx.world_size), sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(ctx.start_epoch, ctx.stop_epoch):
        torch.manual_seed(ctx.seed * 100_003 + epoch)  # dropout draws depend on the epoch only
        sampler.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            opt.zero_grad()
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            count += len(yb)
        model.eval()
        with torch.no_grad():
            logits = model(x_val.to(ctx.device))
            val_loss = float(loss_fn(logits, y_val.to(ctx.device)))
            accuracy = float((logits.argmax(1).cpu() == y_val).float().mean())
        ctx.report(epoch + 1, loss=total / max(count, 1), val_loss=val_loss, accuracy=accuracy)
        ctx.save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1},
                            epoch=epoch + 1)


def train_final(config: dict[str, Any], epochs: int, seed: int = 0) -> dict[str, float]:
    """Train one model with ``config`` for ``epochs`` epochs outside a tuning run; returns its
    validation loss and accuracy (what a pipeline downstream of tuning does with the best config)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    model = _model(int(config["width"]), float(config["dropout"]))
    opt = torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=float(config["momentum"]),
                          weight_decay=float(config["weight_decay"]))
    x_train, y_train, x_val, y_val = _data()
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=int(config["batch_size"]), shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x_val)
        accuracy = float((logits.argmax(1) == y_val).float().mean())
        return {"val_loss": float(loss_fn(logits, y_val)), "accuracy": accuracy}
