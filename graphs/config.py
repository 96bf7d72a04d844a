"""Config dataclasses and the preset registry.

One dataclass per thing: `VQVAEConfig` (the tokenizer), `VARConfig` (the transformer),
`SSGConfig` (guidance), `SamplerConfig` (sampling). Presets are looked up by exact name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from var_ssg.common.errors import ConfigError

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)   # official `--pn 512` (utils/arg_util.py)
TRT_TOPK_LIMIT = 3840   # TensorRT's documented max K for TopK (10.x and 11.x)

# Accepted ranges of the run-time numbers. The graphs compute in float32 (max 3.4e38): logits
# of magnitude ~1e2 times a guidance or beta of 1e4, divided by a temperature of 1e-4, stay far
# inside it; beyond these bounds the results are inf/NaN or already degenerate (greedy, uniform).
SEED_MAX = 2 ** 63 - 1                  # seeds are stored as signed 64-bit integers
GUIDANCE_MAX = 1e4                      # |--cfg|
BETA_MAX = 1e4                          # |beta_k|
TEMPERATURE_RANGE = (1e-4, 1e4)


# Defaults and choice lists: defined here once, used by the graphs, the runtime, the server and
# every CLI.
DEFAULT_TOP_K = 900             # VAR's FID setting (TopK K baked by default)
DEFAULT_TOP_P = 0.96
DEFAULT_TEMPERATURE = 1.0
DEFAULT_GUIDANCE = 1.5          # classifier-free guidance weight (`--cfg`), ramped k/(K-1)
BACKENDS = ("eager", "onnxruntime", "tensorrt")
DSE_TRANSFORMS = ("dct", "dft")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
EAGER_PRECISIONS = ("fp32", "fp16", "bf16")     # what the eager backend computes in (int8, fp8: QDQ graphs only)
# what `--precision` asks of the eager backend over --model (generate, sample, sweep, spectrum;
# DESIGN.md "Low precision"): the weights' dtype, or fp32 weights under torch.autocast
RUN_PRECISIONS = EAGER_PRECISIONS + ("bf16-autocast",)


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096          # V
    z_channels: int = 32            # Cvae
    ch: int = 160
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256

    def __post_init__(self):
        if self.ch % 32:
            raise ConfigError(f"VQVAE ch must be a multiple of 32 (GroupNorm groups), got {self.ch}")
        if self.share_quant_resi < 2:
            raise ConfigError("only partially shared phi (share_quant_resi >= 2) is supported, as in the official VQVAE")

    def phi_index(self, k: int) -> int:
        """The phi used at scale k: the tick nearest k/(K-1) (ties go to the lower index)."""
        import numpy as np      # the official ticks: np.linspace, np.argmin (exact ties decide k=2, k=7)
        n, K = self.share_quant_resi, len(self.patch_nums)
        ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
        return int(np.argmin(np.abs(ticks - k / (K - 1))))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


@dataclass(frozen=True)
class VARConfig:
    depth: int
    vae: VQVAEConfig = field(default_factory=VQVAEConfig)
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    shared_aln: bool = False        # one AdaLN projection for all blocks (official d36)
    name: str = ""
    # derived
    width: int = field(init=False)
    num_heads: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        object.__setattr__(self, "width", 64 * self.depth)
        object.__setattr__(self, "num_heads", self.depth)
        object.__setattr__(self, "head_dim", 64)

    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return self.vae.patch_nums

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def begin_ends(self) -> Tuple[Tuple[int, int], ...]:
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return tuple(out)

    @property
    def V(self) -> int:
        return self.vae.vocab_size

    @property
    def Cvae(self) -> int:
        return self.vae.z_channels


# Small VQVAE used by tests: official architecture, fewer channels and codes.
TINY_VAE = VQVAEConfig(vocab_size=64, z_channels=8, ch=32)
# published weights by (depth, image size); all use the same VQVAE file
OFFICIAL_CKPTS = {(16, 256): "var_d16.pth", (20, 256): "var_d20.pth", (24, 256): "var_d24.pth",
                  (30, 256): "var_d30.pth", (36, 512): "var_d36.pth"}
OFFICIAL_VAE_CKPT = "vae_ch160v4096z32.pth"

_PRESET_RE = re.compile(r"var-d([1-9][0-9]?)(-512)?(-tiny)?")     # fullmatch: "var-d16\n" is no name
_EXAMPLES = ("var-d16, var-d20, var-d24, var-d30 (official, 256px), var-d36 (official, = var-d36-512), "
             "var-dN for any depth N (256px, e.g. var-d2), var-dN-512 (512px, shared AdaLN), "
             "and either with -tiny (small VQVAE, tests: var-d2-tiny, var-d2-512-tiny)")


def get_preset(name: str) -> VARConfig:
    """`var-dN`: the official 256px builder for any depth N. `var-dN-512`: the 512px family as
    the official d36 was trained (`--pn 512 --saln 1`: 512px patch numbers, shared AdaLN).
    `var-d36` is `var-d36-512` (the only published d36). `-tiny` swaps in a small VQVAE."""
    m = _PRESET_RE.fullmatch(name or "") if isinstance(name, str) else None
    if not m:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {_EXAMPLES}")
    depth = int(m.group(1))
    px512 = bool(m.group(2)) or depth == 36
    vae = replace(TINY_VAE if m.group(3) else VQVAEConfig(), patch_nums=PATCH_NUMS_512 if px512 else PATCH_NUMS_256)
    return VARConfig(depth=depth, vae=vae, shared_aln=px512, name=name)


@dataclass(frozen=True)
class SSGConfig:
    """Scaled Spatial Guidance. `betas[k-1]` is the strength at scale k (k = 1..K-1)."""
    betas: Tuple[float, ...]
    transform: str = "dct"          # "dct" | "dft"
    spec: str = ""                  # the string the schedule was parsed from

    def __post_init__(self):
        if self.transform not in DSE_TRANSFORMS:
            raise ConfigError(f"--dse must be one of {', '.join(DSE_TRANSFORMS)}, got {self.transform!r}")
        if any(not (math.isfinite(b) and abs(b) <= BETA_MAX) for b in self.betas):
            raise ConfigError(f"SSG beta values must be within -{BETA_MAX:g}..{BETA_MAX:g} (float32 range), got "
                              f"{', '.join(f'{b:g}' for b in self.betas if not abs(b) <= BETA_MAX)}")

    def beta(self, k: int) -> float:
        return 0.0 if k == 0 else self.betas[k - 1]


# Ours: the paper publishes no schedule. A mild linear ramp that grows with resolution.
DEFAULT_SSG_BETA = "linear:0.1,0.3"
_BETA_FORMS = ("accepted --ssg-beta forms: '0' (off), a float like '0.2', "
               "'linear:START,END' like 'linear:0.1,0.3', or K-1 comma-separated floats like "
               "'0.1,0.1,0.2,0.2,0.2,0.3,0.3,0.3,0.3'")


def parse_ssg_beta(spec: str, num_scales: int = 10) -> Tuple[float, ...]:
    """Parse a beta schedule string into K-1 per-scale values."""
    n = num_scales - 1
    s = str(spec).strip()

    def num(t: str) -> float:
        try:
            v = float(t)
        except ValueError:
            raise ConfigError(f"malformed --ssg-beta {spec!r}: {t!r} is not a number; {_BETA_FORMS}") from None
        if not math.isfinite(v):
            raise ConfigError(f"malformed --ssg-beta {spec!r}: values must be finite; {_BETA_FORMS}")
        return v

    if not s:
        raise ConfigError(f"empty --ssg-beta; {_BETA_FORMS}")
    if s.startswith("linear:"):
        parts = s[len("linear:"):].split(",")
        if len(parts) != 2:
            raise ConfigError(f"malformed --ssg-beta {spec!r}: linear needs START,END; {_BETA_FORMS}")
        a, b = num(parts[0]), num(parts[1])
        if n == 1:
            return (a,)
        return tuple(a + (b - a) * i / (n - 1) for i in range(n))
    if "," in s:
        vals = tuple(num(t) for t in s.split(","))
        if len(vals) != n:
            raise ConfigError(f"malformed --ssg-beta {spec!r}: a list needs exactly {n} values "
                              f"(one per scale 1..{n}), got {len(vals)}; {_BETA_FORMS}")
        return vals
    return (num(s),) * n


def make_ssg(spec: str = DEFAULT_SSG_BETA, transform: str = "dct", num_scales: int = 10) -> SSGConfig:
    return SSGConfig(betas=parse_ssg_beta(spec, num_scales), transform=transform, spec=str(spec))


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling as in DESIGN.md, "Sampling". `top_k_max` is what a graph bakes in (TopK's K);
    `top_k` <= top_k_max is chosen per run. top_k 0 means no top-k (all V); None: VAR's 900, or
    the artifacts' baked K when that is smaller."""
    top_k: Optional[int] = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    temperature: float = DEFAULT_TEMPERATURE

    def __post_init__(self):
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = no top-k), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise ConfigError(f"--top-p must be in [0, 1] (0 = off), got {self.top_p}")
        lo, hi = TEMPERATURE_RANGE
        if not lo <= self.temperature <= hi:     # also refuses NaN
            raise ConfigError(f"--temperature must be in {lo:g}..{hi:g} (logits/temperature must stay finite in "
                              f"float32; use --top-k 1 for greedy sampling), got {self.temperature:g}")

    @property
    def top_p_threshold(self) -> float:
        """The value fed to graphs: 0 ("off") becomes a mass no prefix can reach."""
        return 2.0 if self.top_p <= 0 or self.top_p >= 1 else self.top_p


def topk_bake(top_k: Optional[int], vocab: int) -> int:
    """K baked into a sampler graph. 0 means the sort-free bisection sampler (no top-k)."""
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    if top_k <= 0 or top_k >= vocab:
        return 0 if vocab > TRT_TOPK_LIMIT else vocab
    return top_k


def check_guidance(w: float) -> float:
    """The classifier-free guidance weight (`--cfg` on the command line)."""
    if not math.isfinite(w):
        raise ConfigError(f"--cfg must be a finite number, got {w}")
    if abs(w) > GUIDANCE_MAX:
        raise ConfigError(f"--cfg must be within -{GUIDANCE_MAX:g}..{GUIDANCE_MAX:g} (larger weights overflow "
                          f"float32 logits), got {w:g}")
    return w


def check_seed(seed, flag: str = "--seed") -> int:
    """A seed: an integer in 0..2**63-1 (the noise streams' seeds: runtime/noise.py; the manifest's int64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{flag} must be an integer in 0..{SEED_MAX}, got {seed!r:.40}")
    return seed
