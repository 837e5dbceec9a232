"""Evaluation settings: where the sites' data come from and how hard G and the segmenter train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asyndgan.codec import Codec
from asyndgan.experiments.segmenter import SegConfig

__all__ = ["EMBEDDED", "EvalOptions", "Setting", "default_settings", "embedded_setting"]

EMBEDDED = "embedded:icbm152"


@dataclass(frozen=True)
class Setting:
    """One evaluation setting: where the sites' data come from and how hard G and the segmenter train."""

    name: str
    description: str
    site_specs: tuple[str, ...]
    heldout_specs: tuple[str, ...]  # pooled; empty: cut a contiguous block out of every site (holdout_fraction, _gap)
    size: int | None = None
    gen_steps: int = 300  # the cap: G stops earlier once its sites' L1 is flat (experiments.convergence)
    gen_budget_minutes: float = 0.0  # G's training time budget per generator (0: none)
    gen_patience: int = 3  # G stops after this many 50-step windows without a 1 % gain in its sites' L1
    gen_batch: int = 4  # per site per step; the centralised pix2pix draws gen_batch x n_sites per step
    gen_ema: float = 0.0  # both generators' images from a moving average of their weights (TrainConfig.ema)
    gen_stale: bool = False  # AsynDGAN G applies each batch's gradients one step late (GeneratorTrainer.step)
    site_styles: bool = False  # AsynDGAN G also takes the site whose scanner it renders (GeneratorTrainer styles)
    ngf: int = 32
    ndf: int = 32
    generator: str = "auto"
    curve_points: int = 4
    seg: SegConfig = field(default_factory=SegConfig)
    seg_from_task: bool = False  # replace ``seg`` by SegConfig.for_task(the loaded data) (custom sites)
    holdout_fraction: float = 0.15
    holdout_gap: int = 4
    shifted_specs: tuple[str, ...] = ()  # optional second test set from a domain no site has (Dice only)
    codec: str = "f32"  # AsynDGAN's fakes (and gradients) as the wire carries them (f32 = lossless)
    grad_codec: str = ""  # the gradients' codec when it differs from ``codec`` (with the sites' error feedback)

    def validate(self) -> None:
        if not self.site_specs:
            raise ValueError(f"setting {self.name}: no site specs")
        if not self.gen_budget_minutes >= 0:  # also refuses NaN
            raise ValueError(f"setting {self.name}: the budget must be >= 0 minutes")
        if not 0 <= self.gen_ema < 1:
            raise ValueError(f"setting {self.name}: the weight average's decay must be in [0, 1)")
        if self.gen_steps < 1 or self.gen_batch < 1 or self.curve_points < 1 or self.gen_patience < 1:
            raise ValueError(f"setting {self.name}: gen_steps, gen_batch, gen_patience, curve_points must be >= 1")
        if not 0 < self.holdout_fraction < 1 or self.holdout_gap < 0:
            raise ValueError(f"setting {self.name}: holdout fraction must be in (0, 1) and gap >= 0")
        self.seg.validate()
        Codec.parse(self.codec)
        Codec.parse(self.grad_codec or self.codec)

    def snapshot_steps(self) -> list[int]:
        k = min(self.curve_points, self.gen_steps)
        return sorted({max(1, round(self.gen_steps * i / k)) for i in range(1, k + 1)})


@dataclass(frozen=True)
class EvalOptions:
    seeds: tuple[int, ...] = (0, 1, 2)
    gen_seed: int = 0
    jobs: int = 2  # worker processes (1 = in-process); each worker runs torch with threads // jobs threads
    threads: int = 2
    augment: str = "all"  # (e) for "all" sites or only the "first"
    audit_limit: int = 0  # 0 = every synthetic image; else at most this many per group
    quick: bool = False


def embedded_setting(name: str, description: str, of: int, size: int, orient: str | None, **kw: Any) -> Setting:
    """An embedded-data setting. Held-out: the held-out block imaged by every site's scanner, pooled (a test set
    from the sites' own distribution); shifted: the same block from a reference scanner that no site has."""
    extra = f"&size={size}" + (f"&orient={orient}" if orient else "")
    return Setting(
        name,
        description,
        tuple(f"{EMBEDDED}?site={j}&of={of}{extra}" for j in range(of)),
        tuple(f"{EMBEDDED}?split=heldout&scanner={j}&of={of}{extra}" for j in range(of)),
        shifted_specs=(f"{EMBEDDED}?split=heldout&scanner=reference&of={of}{extra}",),
        **kw,
    )


def default_settings(quick: bool = False, sites: int = 3) -> dict[str, Setting]:
    """``easy`` (64 px, axial only) and ``hard`` (128 px, three orientations); ``quick`` shrinks both to 32 px.
    Step counts are caps: G and the segmenters stop earlier under their stop rules (docs/evaluation.md)."""
    if quick:
        seg = SegConfig(base=8, depth=2, steps=30, batch_size=8, lr=3e-3)
        common: dict[str, Any] = {"gen_steps": 4, "gen_batch": 2, "ngf": 8, "ndf": 8, "curve_points": 2, "seg": seg}
        return {
            "easy": embedded_setting("easy", "quick: 32 px, axial only", sites, 32, "axial", **common),
            "hard": embedded_setting("hard", "quick: 32 px, three orientations", sites, 32, None, **common),
        }
    return {
        "easy": embedded_setting(
            "easy",
            "64 px, axial slices only; held-out block imaged by every site's scanner",
            sites,
            64,
            "axial",
            gen_steps=1500,
            gen_batch=4,
            ngf=32,
            ndf=32,
            curve_points=4,
            seg=SegConfig(steps=1200),
        ),
        "hard": embedded_setting(
            "hard",
            "128 px, axial + coronal + sagittal slices; held-out block imaged by every site's scanner",
            sites,
            128,
            None,
            gen_steps=1500,
            gen_batch=4,
            ngf=16,
            ndf=16,
            curve_points=4,
            gen_patience=6,  # at 128 px the images keep getting more useful after the sites' L1 levels off
            seg=SegConfig(crop=64, steps=1200),
        ),
    }
