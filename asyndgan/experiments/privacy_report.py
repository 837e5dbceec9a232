"""``privacy.md`` and the targets of the privacy evaluation (issue 11), from the ``privacy.json`` report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["judge", "markdown_report", "summary_lines"]

GOOD_SHARE = 0.90
MARGIN_DB = 1.0
MAX_AUC = 0.60
MIN_RATIO = 0.90
MAX_SLOWDOWN = 1.5
DEFAULT_GUARD = "eps8"


def _small_eps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The guarded modes with epsilon <= 8."""
    return {k: m for k, m in report["modes"].items() if m["epsilon"] is not None and m["epsilon"] <= 8}


def _target(text: str, value: Any, met: bool | None, **extra: Any) -> dict[str, Any]:
    return {"target": text, "value": value, "met": met, **extra}


def _all_met(values: dict[str, Any], ok: Callable[[Any], bool]) -> bool | None:
    if not values or any(v is None for v in values.values()):
        return None
    return all(ok(v) for v in values.values())


def _attack_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    modes = report["modes"]
    out: dict[str, dict[str, Any]] = {}
    none = modes.get("none", {}).get("active")
    share = none["share_ge_30db"] if none else None
    out["unguarded_active_leaks"] = _target(
        f"unguarded active attack: >= {GOOD_SHARE:.0%} of slices >= 30 dB (the harness works)",
        share,
        None if share is None else bool(share >= GOOD_SHARE),
    )
    g = modes.get(DEFAULT_GUARD)
    for kind in ("active", "passive"):
        r = g[kind] if g else None
        med, base = (r["median_psnr_db"], r["baseline_median_psnr_db"]) if r else (None, None)
        met = None if med is None or base is None else bool(med <= base + MARGIN_DB)
        out[f"guarded_{kind}_at_baseline"] = _target(
            f"eps=8 {kind} attack: median PSNR <= class-mean baseline + {MARGIN_DB:g} dB", med, met, baseline=base
        )
    return out


def judge(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of issue 11: its text, the measured value(s) and met (None: not measured in this run)."""
    small = _small_eps(report)
    out = _attack_targets(report)
    aucs = {k: m["membership"]["auc"] for k, m in small.items()}
    out["membership_auc"] = _target(
        f"membership ROC AUC <= {MAX_AUC:.2f} at every eps <= 8", aucs, _all_met(aucs, lambda v: v <= MAX_AUC)
    )
    own = {k: m["memorisation"]["nearest_is_own_source"] for k, m in small.items()}
    out["nearest_own_source"] = _target(
        "nearest-is-own-source share for training label maps <= the same for non-members (L2 and SSIM), every eps <= 8",
        own,
        _all_met(own, lambda v: v["training_l2"] <= v["nonmember_l2"] and v["training_ssim"] <= v["nonmember_ssim"]),
    )
    ratios = {k: m["utility"]["c_over_a"] for k, m in small.items()}
    out["utility"] = _target(
        f"(c)/(a) Dice >= {MIN_RATIO:.2f} at every eps <= 8", ratios, _all_met(ratios, lambda v: v >= MIN_RATIO)
    )
    bench = report.get("step_time")
    ratio = bench["ratio"] if bench else None
    out["step_time"] = _target(
        f"guarded G step <= {MAX_SLOWDOWN:g}x the unguarded one (same thread budget)",
        ratio,
        None if ratio is None else bool(ratio <= MAX_SLOWDOWN),
    )
    return out


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("MET" if met else "MISSED")


def _fmt(v: Any, spec: str = ".3f", unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float | int) and not isinstance(v, bool):
        return f"{v:{spec}}{unit}"
    return str(v)


def _value_text(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_value_text(x)}" for k, x in v.items())
    return _fmt(v)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per target: MET / MISSED / not measured, with the values."""
    return [
        f"{_verdict(t['met']):>12}  {t['target']}: {_value_text(t['value'])}"
        + (f" (baseline {_fmt(t['baseline'], '.2f')} dB)" if "baseline" in t else "")
        for t in report["targets"].values()
    ]


Row = tuple[str, Callable[[dict[str, Any]], str]]


def _db(v: Any) -> str:
    return f"{_fmt(v, '.1f')} dB"


def _pct(v: Any) -> str:
    return _fmt(v, ".0%")


def _spent(m: dict[str, Any]) -> str:
    spent = [x for x in m["training"]["epsilon_spent"] or [] if x is not None]
    return _fmt(max(spent)) if spent else "–"


def _similarity(m: dict[str, Any]) -> str:
    s = m["similarity_heldout"]
    return f"{_db(s['psnr'])} / {_fmt(s['ssim'])}"


def _passive(m: dict[str, Any]) -> str:
    p = m["passive"]
    return f"{_db(p['median_psnr_db'])} ({_pct(p['share_ge_30db'])})"


def _passive_twice(m: dict[str, Any]) -> str:
    p = m["passive"]["seen_ge_2"]
    return f"{p['slices']}, {_db(p['median_psnr_db'])}"


def _active(m: dict[str, Any]) -> str:
    a = m["active"]
    stopped = f", site stopped after {a['steps']} Steps" if a.get("stopped") else ""
    return f"{_db(a['median_psnr_db'])} ({_pct(a['share_ge_30db'])}{stopped})"


def _own(m: dict[str, Any], who: str) -> str:
    own = m["memorisation"]["nearest_is_own_source"]
    return f"{_pct(own[f'{who}_l2'])} / {_pct(own[f'{who}_ssim'])}"


_ROWS: list[Row] = [
    ("noise multiplier σ of D's DP-SGD", lambda m: _fmt(m["training"]["noise_multiplier"])),
    ("ε spent (max over sites)", _spent),
    ("G(held-out label) vs real: L1", lambda m: _fmt(m["similarity_heldout"]["l1"])),
    ("… PSNR / SSIM", _similarity),
    ("(c) Dice, segmenter on G's images", lambda m: _fmt(m["utility"]["c"]["mean"])),
    ("**(c)/(a)**", lambda m: f"**{_fmt(m['utility']['c_over_a'])}**"),
    ("passive: median PSNR (share ≥ 30 dB)", _passive),
    ("… slices seen ≥ 2 times: n, median", _passive_twice),
    ("… baseline (class means), median", lambda m: _db(m["passive"]["baseline_median_psnr_db"])),
    ("active: median PSNR (share ≥ 30 dB)", _active),
    ("… baseline (class means), median", lambda m: _db(m["active"]["baseline_median_psnr_db"])),
    ("membership ROC AUC (member = training slice)", lambda m: _fmt(m["membership"]["auc"])),
    ("… against held-out-block subjects", lambda m: _fmt(m["membership"]["auc_vs_heldout_block"])),
    ("nearest-is-own-source, training labels (L2 / SSIM)", lambda m: _own(m, "training")),
    ("… non-member labels (L2 / SSIM)", lambda m: _own(m, "nonmember")),
    ("G step during training (median, s)", lambda m: _fmt(m["training"]["step_seconds_median"])),
]


def _mode_title(m: dict[str, Any]) -> str:
    return "none (paper)" if m["epsilon"] is None else f"ε = {m['epsilon']:g}"


def _table(report: dict[str, Any]) -> list[str]:
    modes = report["modes"]
    a = report["utility"]["a"]
    lines = [
        "| | " + " | ".join(_mode_title(m) for m in modes.values()) + " |",
        "|---|" + "---:|" * len(modes),
        f"| (a) Dice, segmenter on pooled real | {_fmt(a['mean'])} ± {_fmt(a['std'])} |" + " |" * (len(modes) - 1),
    ]
    lines += [f"| {name} | " + " | ".join(fn(m) for m in modes.values()) + " |" for name, fn in _ROWS]
    return lines


def _head(r: dict[str, Any]) -> list[str]:
    c = r["config"]
    return [
        "# Privacy evaluation: what the site-side guard costs and what it stops",
        "",
        f"Generated {r['created']} by `{' '.join(r['command'])}` ({r['seconds']:.0f} s, torch {r['torch_version']}, "
        f"{r['jobs']} worker(s), {r['threads']} threads in all{', QUICK smoke-test sizes' if r['quick'] else ''}).",
        "",
        f"Setting: {c['sites']} sites of `embedded:icbm152` at {c['size']} px, {c['subjects']} virtual subjects per "
        f"site; G (ngf {c['ngf']}, ndf {c['ndf']}) trained {c['steps']} steps, batch {c['batch']} per site; every "
        f"guarded mode plans its budget for those {c['steps']} steps (δ = {c['delta']:g}). Segmenter seeds "
        f"{c['seeds']}, {c['seg']['steps']} steps each. Active attack: {c['active_steps']} Steps against a real "
        f"discriminator process holding {c['active_subjects']} subjects x {c['active_slices']} slices.",
        "",
    ]


def _targets_table(r: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | value | verdict |", "|---|---|---|"]
    for t in r["targets"].values():
        base = f" (baseline {_fmt(t['baseline'], '.2f')} dB)" if "baseline" in t else ""
        lines.append(f"| {t['target']} | {_value_text(t['value'])}{base} | **{_verdict(t['met'])}** |")
    return [*lines, ""]


def _bench(r: dict[str, Any]) -> list[str]:
    b = r.get("step_time")
    if not b:
        return []
    return [
        "## Step time",
        "",
        f"G step, {b['sites']} sites in-process, batch {b['batch_per_site']} per site, {b['torch_threads']} torch "
        f"thread(s), {b['steps_each']} steps each, interleaved rounds: unguarded {_fmt(b['unguarded_median_s'])} s, "
        f"guarded ({b['guarded_mode']}) {_fmt(b['guarded_median_s'])} s: **{_fmt(b['ratio'], '.2f')}x**.",
        "",
    ]


NOTES = [
    "## How each number is measured",
    "",
    "- *Utility*: (a) = segmenter on the sites' pooled real training slices, (c) = the same segmenter on G's images "
    "for those label maps; both scored (Dice, foreground classes) on held-out subjects imaged by the sites' "
    "scanners; (c)/(a) is the ratio of the means over seeds.",
    "- *Passive*: everything the in-process exchange handed G about site 0 (label maps, G's fakes, returned "
    "gradients) fed to `SliceBook` as `run_passive` does; projection estimator; PSNR against site 0's real slices "
    "(slices never seen are left out of the median and count as not recovered in the share).",
    "- *Active*: `run_active` (interval midpoints halved by gradient signs) against a real `asyndgan discriminator` "
    "process; a guarded site's budget is planned for exactly the attack's Steps.",
    "- *Membership*: ROC AUC of -MSE(G(label), real) with training slices as the positive class, against "
    "other people from the same slabs and scanners (population seed 1); the held-out-block AUC also differs in "
    "slice position.",
    "- *Memorisation*: the memorisation audit on site 0 (reference set: its real training images) for G(training "
    "label maps) and G(non-member label maps); nearest-is-own-source for non-members = share nearer their own real "
    "image than every training image.",
    "",
]


def markdown_report(r: dict[str, Any]) -> str:
    lines = [*_head(r), "## Results per mode", "", *_table(r), "", *_targets_table(r), *_bench(r), *NOTES]
    return "\n".join(lines) + "\n"
