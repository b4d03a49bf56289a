"""Training curves as a picture: the TensorBoard scalars that matter for serving, read back from the event files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

#: (tag, title) of the panels, in order; a tag the run did not log is left out.
PANELS = (("eval/regret_ratio_to_wait", "validation regret / WAIT's"),
          ("eval/regret_ratio_to_nested-wait", "validation regret / Nested WAIT's"),
          ("eval/regret_requests", "validation regret (requests)"),
          ("serving/regret_requests", "training episodes' regret"),
          ("eval/p99_latency_s", "validation p99 latency (s)"),
          ("train/entropy_loss", "policy entropy loss"),
          ("train/value_loss", "value loss"))


#: The least span (s of the optimum's service) a workload panel's regret axis shows: where every policy serves the
#: whole load (the diurnal day) the regrets differ by float noise, which an axis fitted to the data would blow up to
#: fill the panel.
REGRET_AXIS_SPAN_S = 1.0


def readable_limits(values: list[float], span: float = REGRET_AXIS_SPAN_S) -> tuple[float, float] | None:
    """The y-limits that show ``values`` over at least ``span`` (centred on them), or ``None`` where they already
    spread over more (matplotlib's own limits then)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or max(finite) - min(finite) >= span:
        return None
    centre = (max(finite) + min(finite)) / 2
    return centre - span / 2, centre + span / 2


def read_scalars(tensorboard_dir: Path, keep: Callable[[str], bool]) -> dict[str, tuple[list[int], list[float]]]:
    """The scalars of every run under ``tensorboard_dir`` whose tag ``keep`` accepts: tag → (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, tuple[list[int], list[float]]] = {}
    for run_dir in sorted(p for p in tensorboard_dir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        for tag in filter(keep, events.Tags()["scalars"]):
            steps, values = series.setdefault(tag, ([], []))
            for event in events.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
    return series


def plot_curves(tensorboard_dir: Path, out: Path) -> Path | None:
    """Write ``out`` (PNG) with one panel per logged tag of :data:`PANELS`; ``None`` if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(tensorboard_dir, lambda tag: tag in {t for t, _ in PANELS})
    panels = [(tag, title) for tag, title in PANELS if tag in series]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    for ax, (tag, title) in zip(axes[0], panels):
        steps, values = series[tag]
        ax.plot(steps, values, "o-", ms=3, lw=1.2)
        if tag.startswith("eval/regret_ratio"):
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.axhline(1.1, color="grey", ls=":", lw=1)
        ax.set(title=title, xlabel="timesteps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_residual_curves(tensorboard_dir: Path, levels_file: Path, out: Path,
                         margins: tuple[float, float] = (math.inf, math.inf),
                         kept_at: int | None = None, regret_tolerance: float = 0.0) -> Path | None:
    """A residual agent's run (``LLMSched-Residual-v*``): one panel per workload of its validation, the agent's
    validation regret at each evaluation less the best baseline's on the same episodes (seconds of the fluid
    optimum's service; below 0 the agent is ahead), with every baseline's own level as a labelled line (the best at
    0); a panel for the whole validation set against the baseline the agent adjusts, the kept model (the validation
    at frame ``kept_at``, :class:`agents.train.KeptModel`) starred, the validations outside the selection's
    bounds crossed and, with a ``regret_tolerance`` (a share of the adjusted baseline's regret), the band of regrets
    level with the least dotted; the same for the mean p99 difference to that baseline, which decides within the
    band; and, where the run logged them, a panel of the worst
    workload's throughput and p99 change against its best baseline (%), with the selection's ``margins``
    (throughput, p99; shares, drawn where finite; a workload whose adjusted baseline falls short by more is held
    to that baseline's figure instead). ``None`` if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(tensorboard_dir, lambda tag: tag.startswith("eval/regret_s/") or tag in (
        "eval/regret_s", "eval/base_regret_s", "eval/admissible", "eval/worst_throughput_change",
        "eval/worst_p99_change", "eval/p99_difference_s"))
    levels: dict[str, dict[str, float]] = json.loads(levels_file.read_text()) if levels_file.is_file() else {}
    workloads = [tag.removeprefix("eval/regret_s/") for tag in sorted(series) if tag.startswith("eval/regret_s/")]
    if not workloads:
        return None
    worst = "eval/worst_p99_change" in series and "eval/worst_throughput_change" in series
    tail = "eval/p99_difference_s" in series
    columns = 4
    rows = -(-(len(workloads) + 1 + tail + worst) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.7 * rows), squeeze=False)
    colours = {"wait": "tab:green", "wait-adaptive": "tab:olive", "nested-wait": "tab:purple",
               "nested-wait-adaptive": "tab:pink", "nested-wait-margin": "tab:brown", "vllm": "tab:red",
               "sarathi": "tab:orange", "wait-adaptive-stall-free": "yellowgreen",
               "nested-wait-adaptive-stall-free": "tab:cyan", "nested-wait-adaptive-margin-stall-free": "tab:gray"}
    for ax, name in zip(axes.flat, workloads):
        steps, values = series[f"eval/regret_s/{name}"]
        best = min(levels.get(name, {"": 0.0}).values())
        gaps = [v - best for v in values]
        ax.plot(steps, gaps, "o-", ms=2.5, lw=1.2, color="tab:blue", label="agent")
        for policy, level in levels.get(name, {}).items():
            ax.axhline(level - best, color=colours.get(policy, "grey"), lw=0.9, ls="--", label=policy)
        limits = readable_limits(gaps + [level - best for level in levels.get(name, {}).values()])
        if limits is not None:
            ax.set_ylim(*limits)
        ax.ticklabel_format(axis="both", useOffset=False, style="plain")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    overall = axes.flat[len(workloads)]
    if "eval/regret_s" in series and "eval/base_regret_s" in series:
        steps, values = series["eval/regret_s"]
        base = series["eval/base_regret_s"][1][0]
        admissible = series.get("eval/admissible", (steps, [1.0] * len(steps)))[1]
        gains = [v - base for v in values]
        _selection_panel(overall, steps, gains, admissible, kept_at)
        inside = [g for g, ok in zip(gains, admissible) if ok]
        if regret_tolerance > 0 and inside:
            overall.axhline(min(inside) + regret_tolerance * base, color="tab:blue", lw=0.9, ls=":",
                            label="level with the least")
        overall.legend(fontsize=7)
        overall.set_title("all workloads, less the adjusted baseline", fontsize=9)
        if tail:
            steps, values = series["eval/p99_difference_s"]
            panel = axes.flat[len(workloads) + 1]
            _selection_panel(panel, steps, values, admissible, kept_at)
            panel.set_title("mean p99 less the adjusted baseline's (s)", fontsize=9)
    if worst:
        panel = axes.flat[len(workloads) + 1 + tail]
        for tag, colour, label in (("eval/worst_throughput_change", "tab:green", "throughput"),
                                   ("eval/worst_p99_change", "tab:red", "p99")):
            steps, values = series[tag]
            panel.plot(steps, [100 * v for v in values], "o-", ms=2.5, lw=1.2, color=colour, label=label)
        panel.axhline(0.0, color="k", lw=0.9, ls="--")
        for margin, sign, colour in ((margins[0], -1, "tab:green"), (margins[1], 1, "tab:red")):
            if math.isfinite(margin):
                panel.axhline(sign * 100 * margin, color=colour, lw=0.9, ls=":")
        panel.ticklabel_format(axis="both", useOffset=False, style="plain")
        panel.set_title("worst workload against its best baseline (%)", fontsize=9)
        panel.tick_params(labelsize=7)
        panel.legend(fontsize=7)
        panel.grid(alpha=0.3)
    spare = list(axes.flat)[len(workloads) + 1 + tail + worst:]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(workloads)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if spare:  # in a panel of its own, clear of the curves
        spare[-1].legend(handles, labels, loc="center", fontsize=8)
    else:
        fig.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    fig.supxlabel("timesteps", fontsize=9)
    fig.supylabel("validation regret − best baseline's (s of the optimum's service)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _selection_panel(ax: Any, steps: list[int], values: list[float], admissible: list[float],
                     kept_at: int | None) -> None:
    """One validation figure over a run, its validations outside the selection's bounds crossed and the kept one
    starred (what the callback saved, as it recorded it: not re-derived here)."""
    ax.plot(steps, values, "o-", ms=2.5, lw=1.2, color="tab:blue")
    outside = [i for i, ok in enumerate(admissible[:len(steps)]) if not ok]
    ax.plot([steps[i] for i in outside], [values[i] for i in outside], "x", color="tab:red", ms=5,
            label="outside the bounds")
    if kept_at in steps:
        kept = steps.index(kept_at)
        ax.plot([steps[kept]], [values[kept]], "*", color="k", ms=10, label="kept")
    ax.axhline(0.0, color="k", lw=0.9, ls="--")
    ax.ticklabel_format(axis="both", useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
