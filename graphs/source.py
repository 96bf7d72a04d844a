"""Where the weights came from (plain data, no torch): recorded in every artifact and output,
and the one place that words the random-weights note."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

RANDOM_PREFIX = "RANDOM WEIGHTS"                          # how describe() starts for random weights
RANDOM_HINT = "RANDOM weights, not a trained model"       # the commands' one-line reminder


def is_random_note(note: str) -> bool:
    """Whether a weights note (WeightSource.describe, Manifest.source_note) is random weights'."""
    return note.startswith(RANDOM_PREFIX)


@dataclass(frozen=True)
class WeightSource:
    kind: str                        # "checkpoint" | "random"
    seed: Optional[int] = None
    ckpt: Optional[str] = None
    vae_ckpt: Optional[str] = None
    ckpt_sha256: Optional[str] = None
    vae_sha256: Optional[str] = None

    @property
    def random(self) -> bool:
        return self.kind == "random"

    def describe(self) -> str:
        if self.random:
            return f"{RANDOM_PREFIX} (seed {self.seed}) - not a trained model"
        return f"checkpoint {self.ckpt} + {self.vae_ckpt}"

    def to_json(self) -> Dict:
        return {k: v for k, v in self.__dict__.items()}
