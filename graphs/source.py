"""Where the weights came from (plain data, no torch): recorded in every artifact and output,
and the one place that words the random-weights note."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


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
            return f"RANDOM WEIGHTS (seed {self.seed}) - not a trained model"
        return f"checkpoint {self.ckpt} + {self.vae_ckpt}"

    def to_json(self) -> Dict:
        return {k: v for k, v in self.__dict__.items()}
