"""A run's curves as pictures: `python tools/plot_run.py RUN_DIR [RUN_DIR ...] --output run.png`.

Reads the TensorBoard events a pretraining run wrote (RUN_DIR itself, RUN_DIR/tensorboard, or
the first directory below RUN_DIR holding events) and draws, against tokens seen (iterations for
runs written before tokens were logged): training and validation loss, perplexity, learning
rate, throughput (tokens/s), MFU, and downstream task accuracy when the run scored tasks. Several
runs share each panel, one colour per run, for comparison. One PNG, and an HTML page beside it
with the same figure and each run's last values.
"""
import argparse
import base64
import glob
import html
import math
import os

from megatron_biomed.errors import UserError, add_debug_flag, entry_point
from megatron_biomed.utils import atomic_output


class RunDirError(UserError, ValueError):
    pass


def events_dir(run_dir):
    """Where a run's TensorBoard events are: the directory, its tensorboard/, or the first below."""
    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir}: no such directory; give a run directory (its --save or --tensorboard-dir)")
    for d in (run_dir, os.path.join(run_dir, "tensorboard")):
        if glob.glob(os.path.join(d, "events.*")):
            return d
    found = sorted(glob.glob(os.path.join(run_dir, "**", "events.*"), recursive=True))
    if not found:
        raise RunDirError(f"{run_dir}: no TensorBoard events here or below; train with --tensorboard-dir "
                          f"(slurm/pretrain_biomedlm.sbatch writes RUN_DIR/tensorboard)")
    return os.path.dirname(found[0])


def read_scalars(tb_dir, tags=None):
    """{tag: {step: value}} from every events file in `tb_dir` (a resumed run's later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series = {}
    for events in sorted(glob.glob(os.path.join(tb_dir, "events.*"))):
        ea = EventAccumulator(events, size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            if tags is None or tag in tags:
                series.setdefault(tag, {}).update({e.step: e.value for e in ea.Scalars(tag)})
    return series


# (title, y label, [(tag, label)], transform)
PANELS = [
    ("loss", "language-model loss", [("train/loss", "training"), ("validation/loss", "validation")], None),
    ("perplexity", "perplexity (log scale)", [("train/loss", "training"), ("validation/loss", "validation")],
     "exp"),
    ("learning rate", "learning rate", [("train/lr", None)], None),
    ("throughput", "tokens/s", [("train/tokens_per_s", None)], None),
    ("MFU", "model FLOPs utilization", [("train/mfu", None)], None),
    ("downstream tasks", "accuracy", [], None),  # every tasks/<name>/acc tag
]


def _x_axis(series):
    """Tokens seen per iteration when the run logged them, else the iteration itself."""
    tokens = series.get("train/tokens_seen")
    if tokens:
        return (lambda step: tokens.get(step, math.nan)), "tokens seen"
    return (lambda step: step), "iteration"


def plot(runs, png):
    """runs: [(label, series)]; draws the panels that have data into `png`; returns their titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for title, ylabel, tags, how in PANELS:
        if title == "downstream tasks":
            tags = sorted({(t, t.split("/")[1]) for _, s in runs for t in s if t.startswith("tasks/")
                           and t.endswith("/acc")})
        if any(t in s and s[t] for _, s in runs for t, _ in tags):
            panels.append((title, ylabel, tags, how))
    if not panels:
        raise RunDirError("no training scalars in the events (train/loss, train/lr, ...): is it a pretraining run?")
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), dpi=100, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "o--", "s:", "^-."]
    xlabels = set()
    for ax, (title, ylabel, tags, how) in zip(axes.flat, panels):
        for r, (label, series) in enumerate(runs):
            x_of, xlabel = _x_axis(series)
            xlabels.add(xlabel)
            for k, (tag, name) in enumerate(tags):
                points = series.get(tag)
                if not points:
                    continue
                steps = sorted(points)
                ys = [math.exp(min(points[s], 50)) if how == "exp" else points[s] for s in steps]
                parts = [p for p in (label if len(runs) > 1 else None, name) if p]
                ax.plot([x_of(s) for s in steps], ys, styles[k % len(styles)], color=colours[r % len(colours)],
                        label=" ".join(parts) or None, linewidth=1, markersize=3)
        if how == "exp":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(" / ".join(sorted(xlabels)))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_output(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return [p[0] for p in panels]


def _last(series, tag):
    points = series.get(tag)
    return points[max(points)] if points else None


def page(runs, png_bytes, title):
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(label)}</td><td>{max(s.get('train/loss', {0: 0}))}</td>"
        + "".join(f"<td>{v:.4g}</td>" if v is not None else "<td>n/a</td>"
                  for v in (_last(s, "train/tokens_seen"), _last(s, "train/loss"), _last(s, "validation/loss"),
                            _last(s, "train/tokens_per_s")))
        + "</tr>" for label, s in runs)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title></head>"
            f"<body style=\"font-family:system-ui,sans-serif\"><h1>{e(title)}</h1>"
            f"<img alt=\"training curves\" src=\"data:image/png;base64,{base64.b64encode(png_bytes).decode()}\">"
            f"<table border=\"1\" cellpadding=\"4\"><tr><th>run</th><th>last iteration</th><th>tokens seen</th>"
            f"<th>training loss</th><th>validation loss</th><th>tokens/s</th></tr>{rows}</table></body></html>\n")


def build_parser():
    p = argparse.ArgumentParser(prog="plot_run.py", description=__doc__.split("\n\n")[0].split(": ", 1)[0] + ": "
                                "loss, perplexity, learning rate, throughput, MFU and task accuracy against tokens "
                                "seen, from a run's TensorBoard events; several runs on one figure.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run directory (or its TensorBoard directory)")
    p.add_argument("--output", default=None, help="the PNG (default: RUN_DIR/curves.png for one run, curves.png "
                                                  "for several); the HTML page goes beside it (.html)")
    p.add_argument("--labels", nargs="+", default=None, help="one name per run (default: the directories' names)")
    p.add_argument("--title", default=None)
    return add_debug_flag(p)


@entry_point
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise RunDirError(f"--labels: {len(args.labels)} names for {len(args.runs)} runs; give one per run")
    labels = args.labels or [os.path.basename(os.path.normpath(r)) or r for r in args.runs]
    runs = [(label, read_scalars(events_dir(r))) for label, r in zip(labels, args.runs)]
    output = args.output or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    title = args.title or ("training curves: " + ", ".join(labels))
    panels = plot(runs, output)
    with open(output, "rb") as f:
        png_bytes = f.read()
    html_path = os.path.splitext(output)[0] + ".html"
    with atomic_output(html_path, "w", encoding="utf-8") as f:
        f.write(page(runs, png_bytes, title))
    print(f"{len(runs)} run(s), panels: {', '.join(panels)} -> {output}, {html_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
