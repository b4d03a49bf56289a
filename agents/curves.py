"""Training curves as a picture: the TensorBoard scalars that matter for serving, read back from the event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

#: (tag, title) of the panels, in order; a tag the run did not log is left out.
PANELS = (("eval/regret_ratio_to_wait", "validation regret / WAIT's"),
          ("eval/regret_ratio_to_nested-wait", "validation regret / Nested WAIT's"),
          ("eval/regret_requests", "validation regret (requests)"),
          ("serving/regret_requests", "training episodes' regret"),
          ("eval/p99_latency_s", "validation p99 latency (s)"),
          ("train/entropy_loss", "policy entropy loss"),
          ("train/value_loss", "value loss"))


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


def plot_residual_curves(tensorboard_dir: Path, levels_file: Path, out: Path) -> Path | None:
    """A residual agent's run (``LLMSched-Residual-v0``): one panel per workload of its validation, the agent's
    validation regret at each evaluation less the best baseline's on the same episodes (seconds of the fluid
    optimum's service; below 0 the agent is ahead), with every baseline's own level as a labelled line (the best at
    0), and a last panel for the whole validation set against the baseline the agent adjusts. ``None`` if nothing
    was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(tensorboard_dir, lambda tag: tag.startswith("eval/regret_s/") or tag == "eval/regret_s"
                          or tag == "eval/base_regret_s")
    levels: dict[str, dict[str, float]] = json.loads(levels_file.read_text()) if levels_file.is_file() else {}
    workloads = [tag.removeprefix("eval/regret_s/") for tag in sorted(series) if tag.startswith("eval/regret_s/")]
    if not workloads:
        return None
    columns = 4
    rows = -(-(len(workloads) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.7 * rows), squeeze=False)
    colours = {"wait": "tab:green", "wait-adaptive": "tab:olive", "nested-wait": "tab:purple",
               "nested-wait-adaptive": "tab:pink", "nested-wait-margin": "tab:brown", "vllm": "tab:red",
               "sarathi": "tab:orange"}
    for ax, name in zip(axes.flat, workloads):
        steps, values = series[f"eval/regret_s/{name}"]
        best = min(levels.get(name, {"": 0.0}).values())
        ax.plot(steps, [v - best for v in values], "o-", ms=2.5, lw=1.2, color="tab:blue", label="agent")
        for policy, level in levels.get(name, {}).items():
            ax.axhline(level - best, color=colours.get(policy, "grey"), lw=0.9, ls="--", label=policy)
        ax.ticklabel_format(axis="both", useOffset=False, style="plain")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    overall = axes.flat[len(workloads)]
    if "eval/regret_s" in series and "eval/base_regret_s" in series:
        steps, values = series["eval/regret_s"]
        base = series["eval/base_regret_s"][1][0]
        overall.plot(steps, [v - base for v in values], "o-", ms=2.5, lw=1.2, color="tab:blue")
        overall.axhline(0.0, color="k", lw=0.9, ls="--")
        overall.ticklabel_format(axis="both", useOffset=False, style="plain")
        overall.set_title("all workloads, less the adjusted baseline", fontsize=9)
        overall.tick_params(labelsize=7)
        overall.grid(alpha=0.3)
    for ax in list(axes.flat)[len(workloads) + 1:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(workloads)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower right", fontsize=8, ncol=2)
    fig.supxlabel("timesteps", fontsize=9)
    fig.supylabel("validation regret − best baseline's (s of the optimum's service)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
