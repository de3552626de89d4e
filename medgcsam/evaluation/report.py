"""The human-readable evaluation report (Markdown): every ratio with its counts and 95% CI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from medgcsam.evaluation.calibration import T_MAX, T_MIN
from medgcsam.metrics import BY_SOURCE, RANKING, RATIOS, SUMMARY, label


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _with_ci(fig: dict[str, Any], key: str) -> str:
    ci = fig["ci95"].get(key)
    text = _num(fig["headline"].get(key))
    if ci and ci["n_valid"]:
        text += f" ({_num(ci['low'])}-{_num(ci['high'])})"
    return text


def _macro_note(fig: dict[str, Any], classes: list[str]) -> list[str]:
    """Say so when a split lacks a class: its macro figures then average over fewer classes than the model has."""
    missing = [c for c in classes if c not in fig["macro_classes"]]
    if not missing:
        return []
    return ["", f"This split has no images of {', '.join(missing)}: balanced accuracy and the macro AUROC and "
            f"PR-AUC average over {', '.join(fig['macro_classes'])} only, and bootstrap resamples lacking one of "
            "those are skipped for them (their n_valid)."]


def _confusion_table(what: str, entry: dict[str, Any], classes: list[str]) -> list[str]:
    lines = ["", f"### Confusion matrix, {what} (rows = truth)", "", "| | " + " | ".join(classes) + " |",
             "|---" * (len(classes) + 1) + "|"]
    for c, counts, norm in zip(classes, entry["counts"], entry["row_normalised"], strict=True):
        lines.append(f"| {c} | " + " | ".join(f"{n} ({_num(r, 2)})" for n, r in zip(counts, norm, strict=True)) + " |")
    return lines


def _split_section(name: str, fig: dict[str, Any], classes: list[str], threshold: dict[str, Any] | None) -> list[str]:
    boot = fig["bootstrap"]
    lines = [f"## Split `{name}`", "",
             f"{fig['n_images']} images" + (f", {fig['n_patients']} patients" if fig["n_patients"] else "")
             + "; class counts " + ", ".join(f"{c}: {n}" for c, n in fig["class_counts"].items())
             + f". 95% CIs: percentile bootstrap, {boot['resamples']} resamples of {boot['unit']}s.", "",
             "| figure | value (95% CI) |", "|---|---|"]
    for key in SUMMARY:
        lines.append(f"| {key} | {_with_ci(fig, key)} |")
    cal = fig["calibration"]
    lines.append(f"| ece after temperature scaling | {_num(cal['ece_calibrated'])} |")
    lines += _macro_note(fig, classes) + ["",
              "### Per class (one-vs-rest, argmax decisions)", "",
              "| class | TP | FN | FP | TN | " + " | ".join(map(label, RATIOS + RANKING)) + " |",
              "|---" * (5 + len(RATIOS + RANKING)) + "|"]
    for c in classes:
        pc = fig["per_class"][c]
        cells = [_with_ci(fig, f"{k}/{c}") for k in RATIOS + RANKING]
        lines.append(f"| {c} | {pc['tp']} | {pc['fn']} | {pc['fp']} | {pc['tn']} | " + " | ".join(cells) + " |")
    if threshold is not None and "operating_point" in fig:
        op = fig["operating_point"]
        lines += ["", f"### Operating point: p({threshold['positive_class']}) >= {threshold['value']:.4f} "
                  f"({threshold['rule']}, chosen on validation)", "",
                  "| TP | FN | FP | TN | " + " | ".join(map(label, RATIOS)) + " |", "|---" * (4 + len(RATIOS)) + "|",
                  f"| {op['tp']} | {op['fn']} | {op['fp']} | {op['tn']} | "
                  + " | ".join(_with_ci(fig, f"op/{k}") for k in RATIOS)
                  + " |"]
    lines += _confusion_table("argmax decisions", fig["confusion"], classes)
    if fig.get("confusion_decision"):
        lines += _confusion_table("at the operating point: the `decision` column of the predictions",
                                  fig["confusion_decision"], classes)
    if fig.get("by_source"):
        lines += ["", "### By data source", "", "| source | images | " + " | ".join(map(label, BY_SOURCE))
                  + (" | op sensitivity (TP/P) | op specificity (TN/N) |" if threshold else " |"),
                  "|---" * (7 if threshold else 5) + "|"]
        for source, s in fig["by_source"].items():
            only = "" if len(s["macro_classes"]) == len(classes) else f" (over {', '.join(s['macro_classes'])})"
            row = f"| {source} | {s['n_images']} | " + " | ".join(
                _num(s[k]) + ("" if k == "accuracy" else only) for k in BY_SOURCE) + " |"
            if "operating_point" in s:
                o = s["operating_point"]
                row += f" {_num(o['sensitivity'])} ({o['tp']}/{o['tp'] + o['fn']}) | " \
                       f"{_num(o['specificity'])} ({o['tn']}/{o['tn'] + o['fp']}) |"
            lines.append(row)
    lines += ["", f"Figures: `confusion_{name}.png`"
              + (f", `confusion_decision_{name}.png`" if fig.get("confusion_decision") else "")
              + f", `roc_{name}.png`, `pr_{name}.png`, `reliability_{name}.png`; "
              f"per-image predictions: `predictions_{name}.csv`.", ""]
    return lines


def _bound_note(temperature: float) -> str:
    """A temperature at the search bound is no fit: validation was separated perfectly (or all wrong)."""
    if not (math.isclose(temperature, T_MIN, rel_tol=1e-3) or math.isclose(temperature, T_MAX, rel_tol=1e-3)):
        return ""
    return (f" It sits at the bound of the search range [{T_MIN}, {T_MAX}]: the validation split is separated "
            "perfectly (or not at all), so it carries no calibration information, and the calibrated figures "
            "on test should not be trusted.")


def _no_patients_note(figures: dict[str, Any]) -> list[str]:
    """Without patient ids in validation, it can only be kept apart from training image by image (exact and
    near duplicates), so one patient's images may sit in both: on real PneumoniaMNIST that made the
    validation specificity at the frozen threshold 0.99 and the test specificity 0.71."""
    val = figures["splits"].get("val")
    if val is None or val["n_patients"]:
        return []
    return ["The validation split has no patient ids, so its images, not patients, are resampled, and it is "
            "kept apart from training only by duplicate image. If one patient's images sit in training and "
            "validation, the validation figures, the temperature and the operating point chosen there are "
            "optimistic: judge them on a test split of separate patients.", ""]


def _evaluated_manifest(entry: dict[str, str] | None) -> str:
    """The manifest scored here, which a later `evaluate` may take from another pipeline than training's."""
    return f" Evaluated manifest `{Path(entry['path']).name}`, sha256 `{entry['sha256']}`." if entry else ""


def write_report(figures: dict[str, Any], path: Path) -> Path:
    """Render ``figures`` (the evaluation JSON) as Markdown at ``path``."""
    model, thr = figures["model"], figures["threshold"]
    lines = ["# Evaluation report", "",
             f"Model `{model['backbone']}`, classes {', '.join(model['classes'])}; trained on manifest sha256 "
             f"`{model['manifest_sha256'] or 'n/a'}`, config sha256 `{model['config_sha256'] or 'n/a'}`."
             + _evaluated_manifest(figures.get("evaluated_manifest")), "",
             f"Temperature (fitted on validation): {figures['temperature']:.4f}." + _bound_note(figures['temperature']),
             (f"Operating point: p({thr['positive_class']}) >= {thr['value']:.4f}, rule {thr['rule']}, chosen on "
              "validation and frozen." if thr else f"Operating point: {figures['threshold_note']}."), ""]
    lines += _no_patients_note(figures)
    for name, fig in figures["splits"].items():
        lines += _split_section(name, fig, model["classes"], thr)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _ci_text(value: float, ci: dict[str, Any] | None) -> str:
    text = _num(value)
    if ci and ci.get("n_valid", 1) and ci.get("low") is not None and not math.isnan(ci["low"]):
        text += f" ({_num(ci['low'])} to {_num(ci['high'])})"
    return text


def write_external_report(figures: dict[str, Any], path: Path) -> Path:
    """Render an external validation (``validate_external``'s JSON) as Markdown at ``path``."""
    model, thr, ext = figures["model"], figures["threshold"], figures["external_manifest"]
    lines = ["# External validation report", "",
             f"Model `{model['backbone']}`, classes {', '.join(model['classes'])}; trained on manifest sha256 "
             f"`{model['manifest_sha256'] or 'n/a'}`.", "",
             f"Evaluated manifest `{Path(ext['path']).name}`, sha256 `{ext['sha256']}`, {ext['rows']} included rows "
             "(split and fold columns ignored: every included row is external).", "",
             f"Frozen temperature {figures['temperature']:.4f} (from {figures['temperature_source']}). "
             + (f"Frozen operating point: p({thr['positive_class']}) >= {thr['value']:.4f} ({thr['rule']}, chosen "
                "on the training site's validation split). Nothing was fitted on these images."
                if thr else "No operating point stored with the model: decisions are the argmax."), ""]
    internal_thr = figures.get("internal_threshold")
    if thr and internal_thr and abs(internal_thr["value"] - thr["value"]) > 1e-9:
        lines += [f"Warning: the model's own evaluation used threshold {internal_thr['value']:.4f}, the model card "
                  f"{thr['value']:.4f}; the internal column was measured at the former.", ""]
    rows = figures["comparison"]
    if rows:
        lines += ["## Internal test vs external", "",
                  "Value (95% CI). Difference = external - internal, its 95% CI combining both intervals "
                  "(MOVER, the two sets are independent).", "",
                  "| figure | internal test | external | difference (95% CI) |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['figure']} | {_ci_text(r['internal'], r['internal_ci'])} | "
                         f"{_ci_text(r['external'], r['external_ci'])} | "
                         f"{_ci_text(r['difference'], {'low': r['low'], 'high': r['high']})} |")
        lines.append("")
    else:
        lines += ["No internal test figures were found for this model (its own evaluation), so there is no "
                  "side-by-side table.", ""]
    if (ood := figures.get("ood")) is not None:
        lines += ["## Out-of-distribution flags", "",
                  f"{ood['flagged']} of {ext['rows']} images ({100 * ood['flag_rate']:.1f}%) are flagged as unlike "
                  f"the training data (Mahalanobis distance > {ood['threshold']:.3f}, the threshold that flags "
                  f"{100 * ood['false_alarm_target']:.0f}% of the training site's validation images); median "
                  f"distance {ood['median_score']:.3f}. A flag rate far above "
                  f"{100 * ood['false_alarm_target']:.0f}% means these images differ from the training data, "
                  "and the figures above may not carry over image by image.", ""]
    for name, fig in figures["splits"].items():
        lines += _split_section(name, fig, model["classes"], thr)
    if (refit := figures.get("refit")) is not None:
        lines += ["## Re-fitted on the external images (optimistic)", "",
                  "Temperature and operating point fitted on these same images and scored on them: an upper bound "
                  "on what a local re-calibration could give, not an estimate of it.", "",
                  f"Temperature {refit['temperature']:.4f}, ECE after it {_num(refit['ece'])}."]
        if "operating_point" in refit:
            o, t = refit["operating_point"], refit["threshold"]
            lines += ["", f"Operating point p({t['positive_class']}) >= {t['value']:.4f} ({t['rule']}): "
                      f"sensitivity {_num(o['sensitivity'])} ({o['tp']}/{o['tp'] + o['fn']}), specificity "
                      f"{_num(o['specificity'])} ({o['tn']}/{o['tn'] + o['fp']}), PPV {_num(o['ppv'])}, "
                      f"NPV {_num(o['npv'])}."]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
