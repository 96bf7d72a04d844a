"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, the one ADM's suite runs) in PyTorch.

Why our own module and not a package's: torch-fidelity (maintained, TF-exact) and pytorch-fid
both import torchvision, and torchvision's PyPI wheels for Linux are CUDA builds that fail to
import next to the CPU torch this project installs ("operator torchvision::nms does not
exist"; measured with torchvision 0.28.0 + torch 2.13.0+cpu). The network is ~100 lines of
standard blocks; the weights are torch-fidelity's conversion of the TF graph, loaded strictly
by the same parameter names (`weights-inception-2015-12-05-6726825d.pth`; pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` carries the same names and the same sha256 prefix).

What it computes, as ADM's graph does:
  uint8 N H W 3 → float → TF1 bilinear resize to 299 (legacy: src = dst·in/out, no half-pixel)
  → (x − 128)/128 → Inception-v3 (TF variant: avg pools exclude padding, Mixed_7c max-pools)
  pool   N 2048   pool_3
  spatial N 2023  mixed_6/conv (Mixed_6d's 1×1 branch after ReLU), first 7 channels, 17×17×7 in
                  TF's NHWC order so precomputed mu_s/sigma_s of ADM reference batches apply
  logits N 1008   pool_3 @ softmax weights, no bias (ADM's IS input)
Nothing here downloads: the weights are a local file.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from var_ssg.common.errors import ConfigError

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"          # torch-fidelity's file
ALT_NAMES = ("pt_inception-2015-12-05-6726825d.pth",)               # pytorch-fid's
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_NAME
INPUT_SIZE = 299


class Conv(nn.Module):
    """conv (no bias) → BatchNorm (eps 1e-3, as TF) → ReLU."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):   # TF's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):            # 35×35: Mixed_5b/c/d
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):            # 35→17: Mixed_6a
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, padding=1), Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):            # 17×17: Mixed_6b..6e (factorised 7×7)
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(k=(1, 7), padding=(0, 3)), dict(k=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, **row), Conv(c7, 192, **col)
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = Conv(c7, c7, **col), Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = Conv(c7, c7, **col), Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        self.last_branch1x1 = b1          # read for sFID (mixed_6/conv) right after the forward
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):            # 17→8: Mixed_7a
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):            # 8×8: Mixed_7b (avg pool), Mixed_7c (max pool: so in TF's graph)
    def __init__(self, cin, max_pool):
        super().__init__()
        row, col = dict(k=(1, 3), padding=(0, 1)), dict(k=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, **row), Conv(384, 384, **col)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


def tf1_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of TF1's ResizeBilinear (align_corners=False, no half-pixel centres)."""
    src = np.arange(n_out) * (n_in / n_out)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - w)
    np.add.at(m, (np.arange(n_out), i1), w)
    return torch.from_numpy(m)


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self._resize = {}

    @torch.inference_mode()
    def forward(self, images_NHW3: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = images_NHW3.permute(0, 3, 1, 2).float()                     # N 3 H W in 0..255
        H, W = x.shape[-2:]
        if (H, W) not in self._resize:
            self._resize[(H, W)] = (tf1_resize_matrix(H, INPUT_SIZE).float(), tf1_resize_matrix(W, INPUT_SIZE).float())
        rh, rw = (m.to(x.device) for m in self._resize[(H, W)])
        x = torch.einsum("oh,nchw,pw->ncop", rh, x, rw)                  # N 3 299 299
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)                                       # N 192 35 35
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = m(x)
        pool = x.mean(dim=(2, 3))                                       # N 2048
        spatial = self.Mixed_6d.last_branch1x1[:, :7].permute(0, 2, 3, 1).flatten(1)   # N 17*17*7, NHWC
        self.Mixed_6d.last_branch1x1 = None
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


def find_weights(path: Optional[str] = None) -> str:
    """The local weights file: `path`, else torch's hub cache. Never downloads."""
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"--inception-weights {path}: no such file (get {WEIGHTS_NAME} from {WEIGHTS_URL})")
        return path
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    for name in (WEIGHTS_NAME, *ALT_NAMES):
        if os.path.isfile(os.path.join(cache, name)):
            return os.path.join(cache, name)
    raise ConfigError(f"Inception weights not found: give --inception-weights FILE or put {WEIGHTS_NAME} in "
                      f"{cache}/ (download it on a machine with network from {WEIGHTS_URL})")


def load_inception(path: Optional[str] = None, device: str = "cpu") -> FIDInception:
    path = find_weights(path)
    net = FIDInception()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(sd, strict=True)
    except Exception as e:   # noqa: BLE001 - any failure here is a bad file, said in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not the FID Inception state dict ({WEIGHTS_NAME}): {first}") from None
    return net.eval().to(device)
