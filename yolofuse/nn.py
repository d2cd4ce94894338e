"""The one custom layer of the dual-stream model, registered where Ultralytics' model parser looks for layers."""

import torch
from torch import nn
from ultralytics.nn import tasks

RGB_CHANNELS = 3  # stacked input order is fixed: R, G, B, then the IR channel(s)


class Modality(nn.Module):
    """Pass one modality of the stacked input through and zero the other.

    Zeroing instead of slicing keeps the output as wide as the input, which is the width Ultralytics'
    `parse_model` books for a layer it does not know; a following conv then sees exactly one modality
    (its weights on the zeroed channels get no gradient). Works for 4 (IR 1-channel) and 6 (IR 3-channel) inputs.
    """

    def __init__(self, modality: str = "rgb"):
        super().__init__()
        if modality not in ("rgb", "ir"):
            raise ValueError(f"Modality must be 'rgb' or 'ir', got {modality!r}")
        self.modality = modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(x[:1, :, :1, :1])
        if self.modality == "rgb":
            keep[:, :RGB_CHANNELS] = 1
        else:
            keep[:, RGB_CHANNELS:] = 1
        return x * keep

    def extra_repr(self) -> str:
        return self.modality


tasks.Modality = Modality  # parse_model resolves yaml layer names in the globals of ultralytics.nn.tasks
