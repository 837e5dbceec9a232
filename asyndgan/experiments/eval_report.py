"""``eval.md``: the evaluation's tables in Markdown, from the ``eval.json`` report."""

from __future__ import annotations

from typing import Any

from asyndgan.experiments.segmenter import CONTRAST_RANGES

__all__ = ["markdown_report", "pm"]

_GROUPS = ("real_heldout", "synthetic_heldout_labels", "synthetic_training_labels")


def _q(d: dict[str, float]) -> str:
    return f"{d['p50']:.3f} [{d['p5']:.3f}, {d['p95']:.3f}]"


def pm(d: dict[str, Any], digits: int = 3) -> str:
    """``mean ± std`` of a condition (or any dict with those keys)."""
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _ema_note(cfg: dict[str, Any]) -> str:
    return f"images from a weight average (decay {cfg['gen_ema']:g}); " if cfg.get("gen_ema") else ""


def _heldout_note(cfg: dict[str, Any]) -> str:
    n = len(cfg.get("heldout_specs") or ())
    return f"pooled from {n} held-out spec(s)" if n else "a contiguous block cut from every site"


def _head(r: dict[str, Any]) -> list[str]:
    return [
        "# Evaluation: segmentation from synthetic vs real training data",
        "",
        f"Generated {r['created']} by `{' '.join(r['command']) or 'asyndgan eval'}` "
        f"({r['seconds']:.0f} s, torch {r['torch_version']}, {r['torch_threads']} threads, {r['jobs']} worker(s)"
        f"{', QUICK smoke-test sizes' if r['quick'] else ''}).",
        "",
        f"Dice: {r['dice']}. Segmenter seeds: {r['seeds']}.",
        "",
        f"Generators: {r['generator_note']}.",
        "",
    ]


def _g_end(gens: dict[str, Any]) -> str:
    """How each generator's training ended: 'AsynDGAN: 450 steps, converged (plateau); ...'."""
    parts = []
    for kind, g in gens.items():
        if "stopped_by" not in g:
            continue
        state = "converged" if g["converged"] else "**NOT converged**"
        parts.append(f"{kind}: {g['steps']} steps, {state} ({g['stopped_by']})")
    return "; ".join(parts) or "no stop rule"


def _setting_intro(name: str, s: dict[str, Any]) -> list[str]:
    cfg, data, gens = s["config"], s["data"], s["generators"]
    seg = cfg["segmenter"]
    site_list = ", ".join(f"{x['name']} ({x['slices']} slices)" for x in data["sites"])
    return [
        f"## Setting `{name}`: {s['description']}",
        "",
        f"Sites: {site_list}; held-out: "
        f"{data['heldout_slices']} real slices ({_heldout_note(cfg)}); "
        f"{'x'.join(map(str, data['slice_size']))} px; modalities {', '.join(data['modalities'])}.",
        f"G: {cfg['generator']} ngf={cfg['ngf']}, D ndf={cfg['ndf']}, up to {cfg['gen_steps']} steps "
        f"({_g_end(gens)}), batch {cfg['gen_batch']} per site (centralised: {cfg['centralised_batch']}); wire "
        "codecs: fakes "
        f"{cfg.get('codec', 'f32')}, gradients {cfg.get('grad_codec') or cfg.get('codec', 'f32')}; "
        f"{'AsynDGAN step: stale (each batch applied one step late); ' if cfg.get('gen_stale') else ''}"
        f"{'AsynDGAN G renders each site in its scanner style (site styles); ' if cfg.get('site_styles') else ''}"
        f"{_ema_note(cfg)}"
        "AsynDGAN G trained "
        f"{gens['asyndgan']['seconds']:.0f} s, centralised "
        f"{gens['centralised']['seconds']:.0f} s ({gens['asyndgan']['torch_threads']} "
        "thread(s) each).",
        f"Segmenter: U-Net base {seg['base']}, depth {seg['depth']}, up to {seg['steps']} Adam steps (stop rule: "
        f"validation Dice checked every {seg.get('val_every', 0)} steps, patience {seg.get('patience')}, tol "
        f"{seg.get('tol')}), batch "
        f"{seg['batch_size']}, lr {seg['lr']}, CE + {seg['dice_weight']} x soft Dice"
        f"{f'; random contrast on every channel ({CONTRAST_RANGES})' if seg.get('contrast') else ''}"
        ". Wall time: "
        f"{s['wall_seconds']['total']:.0f} s.",
        "",
    ]


def _converged(c: dict[str, Any]) -> str:
    """'k/n seeds (steps lo-hi)' from a condition's training record; '-' without one."""
    t = c.get("training")
    if t is None:
        return "-"
    seeds = t["per_seed"]
    steps = [p["steps"] for p in seeds]
    k = sum(p["converged"] for p in seeds)
    span = f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}–{max(steps)}"
    return f"{'yes' if k == len(seeds) else 'NO'}: {k}/{len(seeds)} ({span} steps)"


def _dice_table(s: dict[str, Any]) -> list[str]:
    data = s["data"]
    classes = [f"class {k}" for k in range(1, data["num_classes"])]
    shifted = data.get("shifted_slices", 0) > 0
    extra_head, extra_rule = (" mean Dice, unseen scanner |", "---:|") if shifted else ("", "")
    lines = [
        f"| | training data | images | segmenter converged | mean Dice | {' | '.join(classes)} |{extra_head}",
        f"|---|---|---:|---|---:|{'---:|' * len(classes)}{extra_rule}",
    ]
    for key, c in s["conditions"].items():
        per = " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in zip(c["per_class_mean"], c["per_class_std"], strict=True))
        extra = f" {pm(c['shifted'])} |" if shifted else ""
        conv = _converged(c)
        lines.append(f"| ({key}) | {c['label']} | {c['train_images']} | {conv} | **{pm(c)}** | {per} |{extra}")
    a_train = s["conditions"].get("a", {}).get("training")
    if a_train is not None and not a_train["converged"]:
        lines += [
            "",
            "**(a) did not converge**: its validation Dice had not levelled off (the stop rule did not fire) when the "
            "segmenter's step cap was reached, so every ratio to (a) may be a ratio to a weak reference. Raise "
            "`--seg-steps` (docs/evaluation.md).",
        ]
    small = s.get("classes", {}).get("small", [])
    if small:
        share = s["classes"]["small_share"]
        lines += [
            "",
            f"Small classes (under {share:.0%} of the held-out foreground pixels): class "
            f"{', '.join(map(str, small))}; their Dice is in the table but not in the mean Dice, nor in the targets.",
        ]
    if shifted:
        lines += [
            "",
            f"Unseen scanner: the same segmenters on {data['shifted_slices']} held-out slices imaged by a "
            "reference scanner that no site has (a domain shift; the targets are judged on the held-out set "
            "above).",
        ]
    return lines


def _targets_table(t: dict[str, Any]) -> list[str]:
    lines = ["", "| target | measured | met |", "|---|---|---|"]
    lines.append(
        f"| (c) >= 0.98 x (a) | (c)/(a) = {t['c_over_a']['value']:.4f} | "
        f"{'yes' if t['c_over_a']['met'] else '**no**'} |"
    )
    lines.append(
        f"| (c) > every (b) | (c) = {t['c_gt_every_b']['c']:.4f}, best (b) = {t['c_gt_every_b']['best_b']:.4f} | "
        f"{'yes' if t['c_gt_every_b']['met'] else '**no**'} |"
    )
    if "a_converged" in t:
        lines.append(
            f"| (a) converged | every seed's validation Dice flat | {'yes' if t['a_converged']['met'] else '**no**'} |"
        )
    if "e_ge_a" in t:
        e = ", ".join(f"({k}) {v:.4f}" for k, v in t["e_ge_a"]["e"].items())
        lines.append(
            f"| (e) >= (a) | (a) = {t['e_ge_a']['a']:.4f}; {e} | {'yes' if t['e_ge_a']['met'] else '**no**'} |"
        )
    return lines


def _similarity_and_curve(s: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Image similarity, G(held-out label map) vs the real held-out image (images in [-1, 1]; PSNR peak 2):",
        "",
        "| generator | L1 | PSNR (dB) | SSIM |",
        "|---|---:|---:|---:|",
    ]
    for g, v in s["similarity"].items():
        lines.append(f"| {g} | {v['l1']:.4f} | {v['psnr']:.2f} | {v['ssim']:.4f} |")
    lines += [
        "",
        "(c)/(a) against AsynDGAN G training time:",
        "",
        "| G steps | G seconds | (c) mean Dice | (c)/(a) |",
        "|---:|---:|---:|---:|",
    ]
    for p in s["curve"]:
        lines.append(
            f"| {p['step']} | {p['generator_seconds']:.0f} | {p['c_mean']:.4f} ± {p['c_std']:.4f} | "
            f"{p['ratio_to_a']:.4f} ± {p['ratio_std']:.4f} |"
        )
    return lines


def _audit_row(g: str, gname: str, x: dict[str, Any]) -> str:
    share = share_m = own_l2 = own_ss = "—"
    if gname != "real_heldout":
        share = (
            f"{x['share_closer_than_every_real_heldout_l2']:.0%} / {x['share_closer_than_every_real_heldout_ssim']:.0%}"
        )
        share_m = (
            f"{x['share_closer_than_median_real_heldout_l2']:.0%} / "
            f"{x['share_closer_than_median_real_heldout_ssim']:.0%}"
        )
        own_l2, own_ss = _q(x["own_l2"]), _q(x["own_ssim"])
    who = g if gname != "real_heldout" else "(real)"
    return (
        f"| {who} | {gname.replace('_', ' ')} | {x['n']} | {_q(x['l2'])} | {_q(x['ssim'])} | "
        f"{share} | {share_m} | {own_l2} | {own_ss} |"
    )


def _memorisation(s: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Memorisation audit: distance from each image to its nearest real TRAINING image of any site "
        "(L2 = RMS pixel difference, images in [-1, 1], lower = closer; SSIM higher = closer); median "
        "[5 %, 95 %]. *Own* = the real image whose label map G was given (the held-out slice, or the training "
        "source).",
        "",
        "| generator | images | n | nearest-training L2 | nearest-training SSIM | closer than every real "
        "held-out (L2 / SSIM) | closer than the median real held-out (L2 / SSIM) | own L2 | own SSIM |",
        "|---|---|---:|---|---|---|---|---|---|",
    ]
    for g, m in s["memorisation"].items():
        for gname in _GROUPS:
            if g != "asyndgan" and gname == "real_heldout":
                continue  # the same row for every generator
            lines.append(_audit_row(g, gname, m["groups"][gname]))
    for g, m in s["memorisation"].items():
        tr = m["groups"]["synthetic_training_labels"]
        he = m["groups"]["synthetic_heldout_labels"]
        lines += [
            "",
            f"{g}: on training label maps the nearest training image is the very image whose label map G was "
            f"given for {tr['share_nearest_is_own_source_l2']:.0%} (L2) / "
            f"{tr['share_nearest_is_own_source_ssim']:.0%} (SSIM) of them; on held-out label maps "
            f"{he['share_nearer_a_training_image_than_own_l2']:.0%} (L2) / "
            f"{he['share_nearer_a_training_image_than_own_ssim']:.0%} (SSIM) of the synthetic images are nearer to "
            "some training image than to the real held-out slice they depict.",
        ]
    return lines


def markdown_report(r: dict[str, Any]) -> str:
    """The tables of ``eval.md``."""
    lines = _head(r)
    for name, s in r["settings"].items():
        lines += _setting_intro(name, s)
        lines += _dice_table(s)
        lines += _targets_table(s["targets"])
        lines += _similarity_and_curve(s)
        lines += _memorisation(s)
        lines.append("")
    return "\n".join(lines) + "\n"
