"""RAFT optical flow (Teed & Deng, ECCV 2020) with torchvision's architecture and parameter names.

torchvision's released weight files (``raft_large_C_T_SKHT_V2-ff5fadd5.pth`` and the other
``raft_large_*`` / ``raft_small_*`` files of ``torchvision.models.optical_flow``) load into
:class:`RAFT` by path, key for key. The modules are written here rather than imported: the
torchvision wheel on PyPI is a CUDA build that does not import next to the CPU wheel of torch this
project pins, and RAFT needs none of its compiled ops.

Architecture (``large``; ``small`` in brackets): a feature encoder (instance norm) and a context
encoder (batch norm [no norm]) downsample by 8 with residual [bottleneck] blocks; the all-pairs
correlation of the two feature maps is pooled into a 4-level pyramid and looked up in a window of
radius 4 [3] around the current match; a motion encoder, a separable ConvGRU [3x3 ConvGRU] and a
flow head refine the flow ``num_flow_updates`` times; a learned convex mask [bilinear
interpolation] upsamples the 1/8 flow to full resolution. Inputs are ``[N, 3, H, W]`` in
``[-1, 1]`` with ``H, W`` multiples of 8 and at least 128 (:class:`~kvpo.rewards.motion.FlowField`
pads and rescales decoded frames); flows are in pixels, channel 0 = x (right), 1 = y (down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvpo.rewards.checkpoint import check_state, describe, load_tensors


@dataclass(frozen=True)
class RaftSpec:
    """Hyper-parameters of one RAFT variant (torchvision's ``raft_large`` / ``raft_small``)."""

    block: str  # "residual" or "bottleneck"
    feature_layers: tuple[int, ...]
    context_layers: tuple[int, ...]
    context_norm: str | None
    radius: int
    corr_layers: tuple[int, ...]
    flow_layers: tuple[int, int]
    motion_channels: int
    hidden: int
    gru_kernels: tuple[tuple[int, int], ...]
    head_hidden: int
    convex_upsampling: bool
    levels: int = 4


SPECS = {
    "large": RaftSpec(
        "residual", (64, 64, 96, 128, 256), (64, 64, 96, 128, 256), "batch", 4, (256, 192),
        (128, 64), 128, 128, ((1, 5), (5, 1)), 256, True,
    ),
    "small": RaftSpec(
        "bottleneck", (32, 32, 64, 96, 128), (32, 32, 64, 96, 160), None, 3, (96,), (64, 32), 82,
        96, ((3, 3),), 128, False,
    ),
}  # fmt: skip
MIN_SIZE = 128  # the coarsest correlation level needs 2 x 2 cells: 8 * 2 * 2**3 pixels


def _norm(kind: str | None, channels: int) -> list[nn.Module]:
    if kind == "instance":
        return [nn.InstanceNorm2d(channels)]
    if kind == "batch":
        return [nn.BatchNorm2d(channels)]
    return []


def _conv(cin, cout, kernel, stride=1, norm=None, relu=True) -> nn.Sequential:
    """conv (same padding, bias) -> optional norm -> optional ReLU, indexed 0, 1, ... like
    torchvision's ``Conv2dNormActivation``."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2), *_norm(norm, cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class _Block(nn.Module):
    """Residual (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 at a quarter width) block with a
    projected shortcut when it strides: ``relu(shortcut(x) + convs(x))``."""

    def __init__(self, kind: str, cin: int, cout: int, norm: str | None, stride: int):
        super().__init__()
        if kind == "residual":
            self.convnormrelu1 = _conv(cin, cout, 3, stride, norm)
            self.convnormrelu2 = _conv(cout, cout, 3, 1, norm)
        else:
            self.convnormrelu1 = _conv(cin, cout // 4, 1, 1, norm)
            self.convnormrelu2 = _conv(cout // 4, cout // 4, 3, stride, norm)
            self.convnormrelu3 = _conv(cout // 4, cout, 1, 1, norm)
        self.downsample = nn.Identity() if stride == 1 else _conv(cin, cout, 1, stride, norm, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convnormrelu2(self.convnormrelu1(x))
        if hasattr(self, "convnormrelu3"):
            y = self.convnormrelu3(y)
        return F.relu(self.downsample(x) + y)


class _Encoder(nn.Module):
    """``[N, 3, H, W] -> [N, layers[4], H / 8, W / 8]``: 7x7 stride-2 stem, three stages of two
    blocks (strides 1, 2, 2), 1x1 output conv."""

    def __init__(self, kind: str, layers: tuple[int, ...], norm: str | None):
        super().__init__()
        self.convnormrelu = _conv(3, layers[0], 7, 2, norm)
        for i, stride in enumerate((1, 2, 2)):
            cin, cout = layers[i], layers[i + 1]
            stage = nn.Sequential(
                _Block(kind, cin, cout, norm, stride), _Block(kind, cout, cout, norm, 1)
            )
            setattr(self, f"layer{i + 1}", stage)
        self.conv = nn.Conv2d(layers[3], layers[4], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.convnormrelu(x))))
        return self.conv(x)


class _GRU(nn.Module):
    """Convolutional GRU: ``h' = (1 - z) h + z tanh(convq([r h, x]))``."""

    def __init__(self, cin: int, hidden: int, kernel: tuple[int, int]):
        super().__init__()
        pad = (kernel[0] // 2, kernel[1] // 2)
        for gate in ("convz", "convr", "convq"):
            setattr(self, gate, nn.Conv2d(hidden + cin, hidden, kernel, padding=pad))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], 1)
        z, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


class _Recurrent(nn.Module):
    def __init__(self, cin: int, hidden: int, kernels: tuple[tuple[int, int], ...]):
        super().__init__()
        for i, kernel in enumerate(kernels):
            setattr(self, f"convgru{i + 1}", _GRU(cin, hidden, kernel))
        self.count = len(kernels)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.count):
            h = getattr(self, f"convgru{i + 1}")(h, x)
        return h


class _Motion(nn.Module):
    """Encodes correlation features and the current flow: ``[N, motion_channels, h, w]`` (the
    last two channels are the flow itself)."""

    def __init__(self, spec: RaftSpec, corr_channels: int):
        super().__init__()
        corr = (corr_channels, *spec.corr_layers)
        for i in range(len(spec.corr_layers)):
            setattr(self, f"convcorr{i + 1}", _conv(corr[i], corr[i + 1], 1 if i == 0 else 3))
        self.convflow1 = _conv(2, spec.flow_layers[0], 7)
        self.convflow2 = _conv(spec.flow_layers[0], spec.flow_layers[1], 3)
        self.conv = _conv(corr[-1] + spec.flow_layers[1], spec.motion_channels - 2, 3)
        self.corr_convs = len(spec.corr_layers)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        for i in range(self.corr_convs):
            corr = getattr(self, f"convcorr{i + 1}")(corr)
        motion = self.convflow2(self.convflow1(flow))
        return torch.cat([self.conv(torch.cat([corr, motion], 1)), flow], 1)


class _FlowHead(nn.Module):
    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(h)))


class _Update(nn.Module):
    def __init__(self, spec: RaftSpec, corr_channels: int):
        super().__init__()
        context = spec.context_layers[-1] - spec.hidden
        self.motion_encoder = _Motion(spec, corr_channels)
        self.recurrent_block = _Recurrent(
            spec.motion_channels + context, spec.hidden, spec.gru_kernels
        )
        self.flow_head = _FlowHead(spec.hidden, spec.head_hidden)

    def forward(self, h, context, corr, flow):
        h = self.recurrent_block(h, torch.cat([context, self.motion_encoder(flow, corr)], 1))
        return h, self.flow_head(h)


class _Mask(nn.Module):
    """Convex upsampling weights: ``[N, 8 * 8 * 9, h, w]`` (scaled by 0.25 as in RAFT)."""

    def __init__(self, cin: int):
        super().__init__()
        self.convrelu = _conv(cin, 256, 3)
        self.conv = nn.Conv2d(256, 8 * 8 * 9, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return 0.25 * self.conv(self.convrelu(h))


def correlation_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int) -> list:
    """All-pairs correlation ``<f1(p), f2(q)> / sqrt(C)`` as ``[N h w, 1, h, w]`` volumes, then
    ``levels - 1`` 2x2 average poolings over ``q``."""
    n, c, h, w = fmap1.shape
    corr = fmap1.reshape(n, c, h * w).transpose(1, 2) @ fmap2.reshape(n, c, h * w)
    volume = (corr / math.sqrt(c)).reshape(n * h * w, 1, h, w)
    pyramid = [volume]
    for _ in range(levels - 1):
        volume = F.avg_pool2d(volume, 2, 2)
        pyramid.append(volume)
    return pyramid


def lookup(pyramid: list, coords: torch.Tensor, radius: int) -> torch.Tensor:
    """Correlation features around ``coords`` ``[N, 2, h, w]`` (x, y in 1/8 pixels):
    ``[N, levels * (2r + 1)^2, h, w]``, bilinear, zero outside. Window cell ``(i, j)`` samples
    the point ``(x / 2^l + d_i, y / 2^l + d_j)`` with ``d = -r .. r`` (RAFT's order: the first
    window axis moves along x)."""
    n, _, h, w = coords.shape
    d = torch.arange(-radius, radius + 1, device=coords.device, dtype=coords.dtype)
    window = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)  # [S, S, 2]
    centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    features = []
    for level, volume in enumerate(pyramid):
        points = centre / 2**level + window
        vh, vw = volume.shape[-2:]
        grid = torch.stack(
            [2 * points[..., 0] / (vw - 1) - 1, 2 * points[..., 1] / (vh - 1) - 1], dim=-1
        )
        sampled = F.grid_sample(volume, grid, mode="bilinear", align_corners=True)
        features.append(sampled.reshape(n, h, w, -1))
    return torch.cat(features, dim=-1).permute(0, 3, 1, 2).contiguous()


def upsample(flow: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[N, 2, h, w]`` (1/8 pixels) -> ``[N, 2, 8h, 8w]`` (pixels): each output pixel a softmax-
    weighted mix of the 3x3 neighbourhood of its cell (``mask``), or bilinear when None."""
    n, _, h, w = flow.shape
    if mask is None:
        return 8 * F.interpolate(flow, size=(8 * h, 8 * w), mode="bilinear", align_corners=True)
    weights = torch.softmax(mask.reshape(n, 1, 9, 8, 8, h, w), dim=2)
    patches = F.unfold(8 * flow, 3, padding=1).reshape(n, 2, 9, 1, 1, h, w)
    out = (weights * patches).sum(dim=2)  # [n, 2, 8 (dy), 8 (dx), h, w]
    return out.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, 8 * h, 8 * w)


class RAFT(nn.Module):
    """RAFT (``arch`` "large" or "small"); parameter names are torchvision's.

    ``forward(image1, image2)``: ``[N, 3, H, W]`` each in ``[-1, 1]`` -> flow ``[N, 2, H, W]``
    fp32-or-input-dtype pixels from ``image1`` to ``image2`` after ``num_flow_updates``
    refinements (the last of torchvision's list of predictions).
    """

    def __init__(self, arch: str = "large", num_flow_updates: int = 12):
        super().__init__()
        if arch not in SPECS:
            raise ValueError(f"RAFT arch must be one of {sorted(SPECS)}, got {arch!r}")
        self.arch, self.spec, self.num_flow_updates = arch, SPECS[arch], num_flow_updates
        spec = self.spec
        self.feature_encoder = _Encoder(spec.block, spec.feature_layers, "instance")
        self.context_encoder = _Encoder(spec.block, spec.context_layers, spec.context_norm)
        self.update_block = _Update(spec, spec.levels * (2 * spec.radius + 1) ** 2)
        self.mask_predictor = _Mask(spec.hidden) if spec.convex_upsampling else None

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        n, _, height, width = image1.shape
        if height % 8 or width % 8 or min(height, width) < MIN_SIZE:
            raise ValueError(
                f"RAFT needs H and W that are multiples of 8 and at least {MIN_SIZE}, "
                f"got {height} x {width}"
            )
        fmap1, fmap2 = self.feature_encoder(torch.cat([image1, image2])).chunk(2)
        pyramid = correlation_pyramid(fmap1, fmap2, self.spec.levels)
        hidden, context = self.context_encoder(image1).split(
            [self.spec.hidden, self.spec.context_layers[-1] - self.spec.hidden], dim=1
        )
        hidden, context = torch.tanh(hidden), F.relu(context)
        h, w = height // 8, width // 8
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords0 = torch.stack([xs, ys]).to(fmap1).expand(n, 2, h, w)
        coords1 = coords0
        for _ in range(self.num_flow_updates):
            corr = lookup(pyramid, coords1, self.spec.radius)
            hidden, delta = self.update_block(hidden, context, corr, coords1 - coords0)
            coords1 = coords1 + delta
        mask = None if self.mask_predictor is None else self.mask_predictor(hidden)
        return upsample(coords1 - coords0, mask)


def load_raft(path: str | Path, arch: str | None = None, num_flow_updates: int = 12) -> RAFT:
    """A :class:`RAFT` in eval mode with the weights of ``path`` (a torchvision ``.pth`` state
    dict or a ``.safetensors`` file). ``arch`` None: "large" when the file has a mask predictor,
    else "small". Raises one error naming the expected architecture and what the file holds
    (missing, unexpected or mis-shaped keys) when they differ."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RAFT weights: expected a file (torchvision's raft_large_C_T_SKHT_V2-ff5fadd5.pth or "
            f"another raft_large_* / raft_small_* file), found {describe(path)}"
        )
    state = load_tensors(path)
    if arch is None:
        arch = "large" if any(k.startswith("mask_predictor.") for k in state) else "small"
    model = RAFT(arch, num_flow_updates)
    check_state(model.state_dict(), state, f"RAFT ({arch}) weights {path}")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
