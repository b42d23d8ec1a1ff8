"""Export-time folding of a side tuner's affine calibration into the light head's 1x1 laterals.

A ``cst`` task (calibration ``mtc``) hands the head ``F_i = c_i + M_i s_i + m_i`` at every position:
the frozen tap plus a 1x1 up-projection of its side map, scaled per channel; a ``side_tuning`` task
hands it ``d_i c_i + M_i s_i + m_i``, an alpha blend. The light head's first use of ``F_i`` is a 1x1
lateral with BatchNorm, also affine, so in eval mode

    lateral(F_i) = S W (d_i c_i) + S W M_i s_i + S (W m_i - mean) + beta     (S = gamma / sqrt(var + eps))

is one 1x1 convolution over the channels of ``[c_i ; s_i]``. Where the tap is wider than the
lateral's output (mobilenet_v2's c5: 1280 channels against 96), that convolution costs less than
the projection and the lateral together, and the 1280-channel sum is never formed. As BatchNorm
folding in an ONNX export, only the exported graph changes: the torch model is untouched, and the
folded graph agrees with it up to float rounding (``tests/tuners/test_fold.py``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.heads import HeadOutputs
from models.heads.neck import LightFPN
from tuners.task_model import TaskModel


class FoldedGraph(nn.Module):
    """``model.head_outputs`` with the calibration of each level in ``folded`` done by the head's lateral.

    Args:
        tuner: a tuner with ``side_maps``, ``calibrate`` and ``calibration_affine`` (``cst``, ``side_tuning``).
        head: a copy of the task's head whose folded laterals take ``[c_i ; s_i]``.
        folded: per tuner output, whether its calibration is folded.
    """

    def __init__(self, tuner: nn.Module, head: nn.Module, folded: list[bool]) -> None:
        super().__init__()
        self.tuner, self.head, self.folded = tuner, head, folded

    def forward(self, taps: dict[str, Tensor], images: Tensor | None = None) -> HeadOutputs:
        pairs = self.tuner.side_maps(taps, images)
        maps = [
            torch.cat([c, s], dim=1) if fold else self.tuner.calibrate(i, c, s)
            for i, ((c, s), fold) in enumerate(zip(pairs, self.folded))
        ]
        return self.head(maps)


def fold_calibration(model: TaskModel) -> FoldedGraph | None:
    """The folded graph of ``model`` (in eval mode), or None where nothing folds or folding saves nothing.

    A level folds when the tuner's calibration of it is affine, the light head's neck feeds it
    straight to a 1x1 conv + BatchNorm lateral, and the tap has more channels than that lateral's
    output. Other tuners and heads, and ``cst``'s nonlinear ``max`` and ``gate`` calibrations, keep
    their graph.
    """
    tuner, neck = model.tuner, getattr(model.head, "neck", None)
    if not hasattr(tuner, "calibration_affine") or not isinstance(neck, LightFPN) or not _direct(neck, tuner):
        return None
    head = copy.deepcopy(model.head)
    folded = []
    with torch.no_grad():
        for i, lateral in enumerate(head.neck.laterals):
            affine = tuner.calibration_affine(i)
            fold = affine is not None and _is_conv1x1_bn(lateral) and lateral[0].in_channels > lateral[0].out_channels
            if fold:
                head.neck.laterals[i] = merged_lateral(lateral[0], lateral[1], *affine)  # type: ignore[misc]
            folded.append(fold)
    return FoldedGraph(tuner, head, folded) if any(folded) else None


def merged_lateral(conv: nn.Conv2d, bn: nn.BatchNorm2d, tap_scale: Tensor, weight: Tensor, bias: Tensor) -> nn.Conv2d:
    """One 1x1 conv over ``[c ; s]`` equal to ``bn(conv(tap_scale * c + weight @ s + bias))`` in eval mode.

    Args:
        conv: the lateral's 1x1 conv, ``C -> D``, no bias.
        bn: its BatchNorm over ``D`` channels.
        tap_scale: ``[C]``, the calibration's per-channel scale of the tap.
        weight: ``[C, w]``, its matrix on the side map.
        bias: ``[C]``, its offset.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.flatten(1).double()
    merged = nn.Conv2d(w.shape[1] + weight.shape[1], w.shape[0], 1).to(conv.weight.device)
    taps_part, side_part = w * tap_scale.double()[None, :], w @ weight.double()
    merged.weight.copy_((scale[:, None] * torch.cat([taps_part, side_part], dim=1))[:, :, None, None])
    merged.bias.copy_(scale * (w @ bias.double() - bn.running_mean.double()) + bn.bias.double())
    return merged


def _direct(neck: LightFPN, tuner: nn.Module) -> bool:
    """Whether the neck feeds each tuner output ``i`` to lateral ``i``, with no resampling."""
    select, n = neck.select, len(tuner.out_channels)
    return select.sources == list(range(n)) and all(len(r.body) == 0 for r in select.resample)


def _is_conv1x1_bn(lateral: nn.Module) -> bool:
    if not isinstance(lateral, nn.Sequential) or len(lateral) != 2:
        return False
    conv, bn = lateral[0], lateral[1]
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and bn.running_var is not None
    )
