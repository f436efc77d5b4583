"""Recombination teachers: the reconstruction and segmentation methods, SSIM loss, dense teacher training."""
from __future__ import annotations

import torch
from torch import nn

from ...data import images_of
from ..dense import DenseSupervised
from .evaluation import evaluate_dense
from .tasks import IGNORE_INDEX, SSIM_WINDOW, TASK_KINDS


# losses and teacher training
def ssim_loss(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
              sigma: float = 1.5) -> torch.Tensor:
    """``1 − SSIM(images, references)``, differentiable: :func:`kaviz.metrics.ssim_loss` with this paper's
    7×7 window (:data:`SSIM_WINDOW`)."""
    from ... import metrics

    return metrics.ssim_loss(images, references, data_range, window, sigma)


class Reconstruction(nn.Module):
    """Train an autoencoder teacher: ``{"l1": mean |x̂ − x|, "ssim_loss": 1 − SSIM(x̂, x)}`` (labels
    never read); ``evaluate`` reports ``psnr`` and ``ssim`` on the given data."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        x = images_of(batch)
        y = self.model(x)
        if y.shape != x.shape:
            raise ValueError(f"a reconstruction teacher must output the image's shape {tuple(x.shape)}, got "
                             f"{tuple(y.shape)} (build it with 3 output channels and output='sigmoid')")
        return {"l1": (y - x).abs().mean(), "ssim_loss": ssim_loss(y, x)}

    def evaluate(self, data) -> dict:
        return evaluate_dense(self.model, data, kinds={"out": "reconstruction"})


class Segmentation(DenseSupervised):
    """Train a segmentation teacher: the shared :class:`kaviz.methods.dense.DenseSupervised`
    (``{"ce": per-pixel cross-entropy}``, ``ignore_index`` pixels skipped); ``evaluate`` reports ``mIoU``
    and ``pixel_accuracy`` through :func:`evaluate_dense`, as every score of this paper."""

    def __init__(self, model: nn.Module, num_classes: int, ignore_index: int = IGNORE_INDEX):
        super().__init__(model, "segmentation", ignore_index=ignore_index, num_classes=num_classes)

    def evaluate(self, data) -> dict:
        return evaluate_dense(self.model, data, kinds={"out": "segmentation"}, num_classes=self.num_classes,
                              ignore_index=self.ignore_index)


def train_dense_teacher(kind: str, train_data, val_data=None, *, num_classes: int | None = None,
                        widths=(16, 32, 64), epochs: int = 5, lr: float = 2e-3, batch_size: int = 32,
                        weight_decay: float = 0.0, schedule: str | None = "cosine", seed: int = 0,
                        ignore_index: int = IGNORE_INDEX, cache=True, device=None, progress=None):
    """Train (or load from the teacher cache) a ``segnet_small`` teacher; returns ``(model, history)``.

    ``kind="reconstruction"``: an autoencoder ``segnet_small(3, output="sigmoid")`` trained with
    :class:`Reconstruction` (best epoch on ``val/loss``); ``kind="segmentation"``: a
    ``segnet_small(num_classes)`` trained with :class:`Segmentation` (best epoch on ``val/mIoU``).
    Both go through :func:`kaviz.train.train_teacher` with ``method=``, so they are cached like any
    teacher (keyed by the loss, the data fingerprints, every setting, the device type and the CPU
    thread count).
    """
    import functools

    from ...train import train_teacher

    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    if kind == "segmentation":
        num_classes = num_classes if num_classes is not None else getattr(train_data, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"a segmentation teacher needs num_classes >= 2 (the number of mask classes), got "
                             f"{num_classes!r}")
        out, arch_kwargs = num_classes, {"widths": list(widths)}
        method, monitor = functools.partial(Segmentation, num_classes=num_classes,
                                            ignore_index=ignore_index), "val/mIoU"
    else:
        out, arch_kwargs = 3, {"widths": list(widths), "output": "sigmoid"}
        method, monitor = Reconstruction, "val/loss"
    return train_teacher("segnet_small", train_data, val_data, num_classes=out, epochs=epochs, lr=lr,
                         batch_size=batch_size, optimizer="adam", weight_decay=weight_decay, schedule=schedule,
                         seed=seed, arch_kwargs=arch_kwargs, cache=cache, device=device, progress=progress,
                         method=method, monitor=monitor if val_data is not None else "train/loss")
