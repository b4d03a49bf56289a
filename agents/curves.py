"""Training curves as a picture: the TensorBoard scalars that matter for serving, read back from the event files."""

from __future__ import annotations

from pathlib import Path

#: (tag, title) of the panels, in order; a tag the run did not log is left out.
PANELS = (("eval/regret_ratio_to_wait", "validation regret / WAIT's"),
          ("eval/regret_ratio_to_nested-wait", "validation regret / Nested WAIT's"),
          ("eval/regret_requests", "validation regret (requests)"),
          ("serving/regret_requests", "training episodes' regret"),
          ("eval/p99_latency_s", "validation p99 latency (s)"),
          ("train/entropy_loss", "policy entropy loss"),
          ("train/value_loss", "value loss"))


def plot_curves(tensorboard_dir: Path, out: Path) -> Path | None:
    """Write ``out`` (PNG) with one panel per logged tag of :data:`PANELS`; ``None`` if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, tuple[list[int], list[float]]] = {}
    for run_dir in sorted(p for p in tensorboard_dir.iterdir() if p.is_dir()):
        events = EventAccumulator(str(run_dir))
        events.Reload()
        for tag in set(events.Tags()["scalars"]) & {t for t, _ in PANELS}:
            steps, values = series.setdefault(tag, ([], []))
            for event in events.Scalars(tag):
                steps.append(event.step)
                values.append(event.value)
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
