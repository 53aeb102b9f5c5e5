"""Plain Optuna + the textbook PyTorch loop: the baseline of ``study_e2e.py`` (#27), as a user would write it.

``optuna.create_study(TPESampler)`` + ``study.optimize`` over an objective that trains torchvision's ResNet-18
with torchvision transforms on PIL images in a ``DataLoader(num_workers=2)``, fp32, ``loss.item()`` every step,
the images upsampled on the device to the model's size; the first four parameters of the shipped TPE study's
space, a cosine schedule, the validation accuracy reported every epoch.

    python benchmarks/plain_optuna.py ROOT TRIALS EPOCHS IMAGE_SIZE VAL_SIZE DEVICE   # prints {"wall_s": ...}
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from typing import Any

import numpy as np
import optuna
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class Images(Dataset):  # type: ignore[type-arg]
    """What ``torchvision.datasets.CIFAR10`` does per item: an HWC uint8 array -> a PIL image -> transforms."""

    def __init__(self, x: np.ndarray, y: np.ndarray, tf: Any) -> None:
        self.x, self.y, self.tf = x, y, tf

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])


def main() -> None:
    root, trials, epochs, size, val, device = sys.argv[1:7]
    n_trials, n_epochs, px, n_val = int(trials), int(epochs), int(size), int(val)
    xs, ys = [], []
    for i in range(1, 6):
        with open(f"{root}/cifar-10-batches-py/data_batch_{i}", "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys += list(d[b"labels"])
    x, y = np.concatenate(xs).transpose(0, 2, 3, 1), np.array(ys)
    norm = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train_tf = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
    )
    val_tf = transforms.Compose([transforms.ToTensor(), norm])
    dev = torch.device(device)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 0.3, log=True)
        bs = trial.suggest_categorical("batch_size", [64, 128, 256])
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        momentum = trial.suggest_float("momentum", 0.8, 0.99)
        model = torchvision.models.resnet18(num_classes=10).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_epochs)
        train = DataLoader(Images(x[n_val:], y[n_val:], train_tf), bs, shuffle=True, num_workers=2, drop_last=True)
        valid = DataLoader(Images(x[:n_val], y[:n_val], val_tf), 512, num_workers=2)
        acc = 0.0
        for epoch in range(n_epochs):
            model.train()
            for xb, yb in train:
                xb, yb = F.interpolate(xb.to(dev), size=px, mode="bilinear"), yb.to(dev)
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                loss.item()
            sched.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for xb, yb in valid:
                    pred = model(F.interpolate(xb.to(dev), size=px, mode="bilinear")).argmax(1).cpu()
                    correct += int((pred == yb).sum())
            acc = correct / n_val
            trial.report(acc, epoch)
        return acc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=f"sqlite:///{root}/plain.db")
    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    print(json.dumps({"wall_s": time.perf_counter() - start, "trials": len(study.trials)}))


if __name__ == "__main__":
    main()
