"""Site styles: G also takes the site whose scanner it renders (one constant input plane per site)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyndgan.errors import BadRequest, FailedPrecondition
from asyndgan.generator import GeneratorTrainer
from asyndgan.io import load_checkpoint, save_checkpoint
from tests.unit.test_algorithm import CFG, NET, FixedExchange, labels, params

STYLES = ("hospital-a", "hospital-b", "hospital-c")


def styled(**kw: bool) -> GeneratorTrainer:
    return GeneratorTrainer(NET, CFG, num_classes=4, modalities=("t1",), seed=0, image_size=32, styles=STYLES, **kw)


class Inputs:
    """Records the style planes of every input G sees (channels after the 4 label classes)."""

    def __init__(self, gen: GeneratorTrainer) -> None:
        self.seen: list[torch.Tensor] = []
        gen.G.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0][:, 4:, 0, 0].argmax(1)))


def test_a_styled_g_takes_one_plane_per_site_and_renders_them_differently() -> None:
    gen = styled()
    first_conv = next(m for m in gen.G.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 4 + len(STYLES)
    lab = labels(1).repeat(3, 1, 1)
    a, b = gen.synthesize(lab, 0), gen.synthesize(lab, 1)
    assert not torch.allclose(a, b)
    # without a style, map i is rendered in style i mod 3; G is per-sample (instance norm), so row by row equal
    mixed = gen.synthesize(lab)
    for i in range(3):
        torch.testing.assert_close(mixed[i], gen.synthesize(lab[i : i + 1], i)[0], rtol=0, atol=1e-6)
    per_row = gen.synthesize(lab, torch.tensor([2, 2, 0]))  # one style per row
    for i, style in enumerate([2, 2, 0]):
        torch.testing.assert_close(per_row[i], gen.synthesize(lab[i : i + 1], style)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["batched", "pipeline", "stale"])
def test_every_step_variant_gives_each_site_its_style(mode: str) -> None:
    gen = styled(**({mode: True} if mode != "batched" else {}))
    seen = Inputs(gen)
    grads = [torch.randn(2, 1, 32, 32), torch.randn(3, 1, 32, 32)]
    gen.step([labels(2), labels(3)], [1, 1], FixedExchange(grads))  # default: site j is style j
    gen.step([labels(2), labels(3)], [1, 1], FixedExchange(grads), styles=[2, 0])  # e.g. site 1 is not in
    rows = torch.cat(seen.seen).tolist()
    first, second = [0, 0, 1, 1, 1], [2, 2, 0, 0, 0]
    if mode == "stale":  # the second call also replays the first batch through G, in the first batch's styles
        assert rows == first + second + first
    else:
        assert rows == first + second


def test_style_names_and_errors() -> None:
    gen = styled()
    assert gen.style_index("hospital-b") == 1
    with pytest.raises(BadRequest, match="unknown style 'x': this generator renders hospital-a, hospital-b"):
        gen.style_index("x")
    plain = GeneratorTrainer(NET, CFG, num_classes=4, modalities=("t1",), seed=0, image_size=32)
    with pytest.raises(FailedPrecondition, match="without site styles"):
        plain.style_index("hospital-a")
    with pytest.raises(ValueError, match="unique"):
        GeneratorTrainer(NET, CFG, num_classes=4, modalities=("t1",), seed=0, styles=("a", "a"))


def test_styles_are_checkpointed_and_must_match(tmp_path: Path) -> None:
    a = styled()
    a.step([labels(2), labels(3)], [1, 1], FixedExchange([torch.randn(2, 1, 32, 32), torch.randn(3, 1, 32, 32)]))
    save_checkpoint(tmp_path / "g.pt", a.state_dict())
    b = styled()
    b.load_state_dict(load_checkpoint(tmp_path / "g.pt"))
    assert torch.equal(params(a.G), params(b.G))
    plain = GeneratorTrainer(NET, CFG, num_classes=4, modalities=("t1",), seed=0, image_size=32)
    with pytest.raises(ValueError, match="renders the site styles hospital-a, hospital-b, hospital-c, not none"):
        plain.load_state_dict(load_checkpoint(tmp_path / "g.pt"))
    old = plain.state_dict()
    del old["styles"]  # a checkpoint from before site styles: an unstyled G
    with pytest.raises(ValueError, match="renders the site styles none, not hospital-a"):
        styled().load_state_dict(old)
    plain.load_state_dict(old)


def test_a_stale_checkpoint_from_before_styles_resumes(tmp_path: Path) -> None:
    a = GeneratorTrainer(NET, CFG, num_classes=4, modalities=("t1",), seed=0, image_size=32, stale=True)
    a.step([labels(2)], [1], FixedExchange([torch.randn(2, 1, 32, 32)]))
    state = a.state_dict()
    state["held"] = state["held"][:3]  # labels, sizes, gradients: no styles yet
    b = GeneratorTrainer(NET, CFG, num_classes=4, modalities=("t1",), seed=0, image_size=32, stale=True)
    b.load_state_dict(state)
    for g in (a, b):
        g.step([labels(2)], [1], FixedExchange([torch.ones(2, 1, 32, 32)]))
    assert torch.equal(params(a.G), params(b.G))
