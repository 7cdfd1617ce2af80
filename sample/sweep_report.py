"""The sweep's results (sample/sweep.py): one row per judged point, written as a CSV and a markdown table, drawn as
plots (a metric against a key; one metric against another, one curve per value of a key, as Imagen's Fig. 4), and
put into tensorboard's HPARAMS view.

Imagen: Saharia et al. 2022, arXiv 2205.11487, Fig. 4: FID-10K against CLIP score over guidance scales, one curve
per text-encoder size (a) and per U-Net size (b); a curve further down and to the right is better on both.
"""
import csv
import json
import re
import shutil

# The columns of the table besides the keys: (name, where in a judged point's metrics.json, what it is)
METRICS = {
    "fid": (("fid", "fid"), "FID on the shapes classifier's features (lower is better)"),
    "kid": (("fid", "kid", 0), "KID on the same features"),
    "clip_score": (("clip_score", "generated", "torchmetrics_clip_score"), "CLIP score, torchmetrics (judge CLIP)"),
    "clip_s": (("clip_score", "generated", "clip_s"), "CLIP-S (Hessel et al.)"),
    "r_precision": (("r_precision",), "R-precision, top-1 of 100 (judge CLIP)"),
    "colour": (("prompt_accuracy", "heldin", "colour"), "prompt accuracy, colour, held-in pairs"),
    "shape": (("prompt_accuracy", "heldin", "shape"), "prompt accuracy, shape, held-in pairs"),
    "heldout_shape": (("prompt_accuracy", "heldout", "shape"), "prompt accuracy, shape, held-out pairs"),
    "train_s": (("train_seconds",), "wall time of the training run (s)"),
    "s_per_image": (("seconds_per_image",), "sampling wall time per image (s)"),
}


def is_sampling(key):
    return key.startswith("sampler.")


def safe_name(overrides):
    """A folder name for a list of 'key=value' strings."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(overrides)) or "base"


def leaf(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ---------------------------------------------------------------- table, plots, tensorboard

def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def gather(out, runs, keys):
    """One row per judged point: {key: value, ..., metric: value, ..., 'run', 'sample'}."""
    rows = []
    for name, run in runs.items():
        for sample_name, sampling in run["samples"].items():
            path = out / name / sample_name / "metrics.json"
            if not path.exists():
                continue
            report = json.loads(path.read_text())
            row = {"run": name, "sample": sample_name}
            for k in keys:
                row[k] = sampling["values"].get(k) if is_sampling(k) else leaf(run["config"], k)
            for metric, (where, _) in METRICS.items():
                value = report
                for part in where:
                    value = value[part] if value is not None else None
                row[metric] = value
            rows.append(row)
    return rows


def fill_sampling_defaults(rows, keys, args):
    defaults = {"sampler.guidance_scale": args.guidance, "sampler.num_inference_steps": args.steps}
    for row in rows:
        for k in keys:
            if row[k] is None and is_sampling(k):
                row[k] = defaults.get(k, "pipeline default")


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_table(rows, keys, out):
    columns = ["run", "sample", *keys, *METRICS]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns[2:]) + " |", "|" + " --- |" * (len(columns) - 2)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns[2:]) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n\n" + "\n".join(
        f"- {m}: {text}" for m, (_, text) in METRICS.items()) + "\n")
    return "\n".join(lines)


def write_tensorboard(rows, keys, out):
    from torch.utils.tensorboard import SummaryWriter

    folder = out / "tensorboard"
    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole: a second call adds no duplicate
    for row in rows:
        hparams = {k: row[k] if isinstance(row[k], (int, float, str, bool)) else str(row[k]) for k in keys}
        metrics = {f"metrics/{m}": float(row[m]) for m in METRICS if isinstance(row[m], (int, float))}
        with SummaryWriter(str(folder / f"{row['run']}__{row['sample']}")) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")


def axis_values(values):
    """Numbers stay numbers; anything else is laid out at 0, 1, 2, ... in first-seen order with its text as tick."""
    if all(number(v) is not None for v in values):
        return [number(v) for v in values], None
    order = list(dict.fromkeys(str(v) for v in values))
    return [order.index(str(v)) for v in values], order


def plot_against_key(rows, metric, key, keys, path):
    """METRIC against KEY; one line per setting of the other keys that vary in these rows."""
    from matplotlib.figure import Figure  # not pyplot: a notebook that calls this keeps its backend

    others = [k for k in keys if k != key and len({str(r[k]) for r in rows}) > 1]
    lines = {}
    for row in rows:
        if row[metric] is not None:
            lines.setdefault(tuple(str(row[k]) for k in others), []).append(row)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    _, ticks = axis_values([r[key] for r in rows])
    for label, members in lines.items():
        xs, _ = axis_values([r[key] for r in members]) if ticks is None else (
            [ticks.index(str(r[key])) for r in members], None)
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [members[i][metric] for i in order], "o-",
                label=", ".join(f"{k}={v}" for k, v in zip(others, label)) or None)
    if ticks:
        ax.set_xticks(range(len(ticks)), ticks, rotation=20, fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric}: {METRICS[metric][1]}", fontsize=8)
    if any(lines) and others:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pareto_rows(rows, curve_keys, keys, linked, base):
    """The rows whose training keys other than curve_keys (and the keys linked to them by '+') are at base."""
    free = {m for k in curve_keys for m in linked.get(k, [k])}
    fixed = [k for k in keys if not is_sampling(k) and k not in free]
    return [r for r in rows if all(r[k] == leaf(base, k) for k in fixed)]


def plot_pareto(rows, mx, my, curve_keys, keys, linked, base, path, title=""):
    """MY against MX, one curve per value of curve_keys, its points the sampling settings (annotated)."""
    from matplotlib.figure import Figure  # not pyplot: a notebook that calls this keeps its backend

    sampling = [k for k in keys if is_sampling(k) and len({str(r[k]) for r in rows}) > 1]
    curves = {}
    for row in pareto_rows(rows, curve_keys, keys, linked, base):
        if row[mx] is not None and row[my] is not None:
            curves.setdefault(tuple(str(row[k]) for k in curve_keys), []).append(row)
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for label, members in curves.items():
        members.sort(key=lambda r: [number(r[k]) if number(r[k]) is not None else str(r[k]) for k in sampling])
        ax.plot([r[mx] for r in members], [r[my] for r in members], "o-",
                label=", ".join(f"{k}={v}" for k, v in zip(curve_keys, label)))
        for r in members:
            ax.annotate(",".join(fmt(number(r[k]) if number(r[k]) is not None else r[k]) for k in sampling),
                        (r[mx], r[my]), textcoords="offset points", xytext=(3, 3), fontsize=6, alpha=0.7)
    ax.set_xlabel(f"{mx}: {METRICS[mx][1]}", fontsize=8)
    ax.set_ylabel(f"{my}: {METRICS[my][1]}", fontsize=8)
    ax.set_title(title or f"points: {', '.join(sampling) or 'one per run'}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(args, out, runs, keys, linked, base):
    rows = gather(out, runs, keys)
    fill_sampling_defaults(rows, keys, args)
    if not rows:
        print(f"no judged point in {out} yet")
        return rows
    table = write_table(rows, keys, out)
    write_tensorboard(rows, keys, out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for spec in args.plot:
        metric, key = spec.split(":")
        path = plots / (safe_name([f"{metric}_against_{key}"]) + ".png")
        plot_against_key(rows, metric, key, keys, path)
        print(f"wrote {path}")
    for spec in args.pareto:
        mx, my, curve = spec.split(":", 2)
        path = plots / (safe_name([f"{my}_against_{mx}_per_{curve}"]) + ".png")
        plot_pareto(rows, mx, my, curve.split(","), keys, linked, base, path)
        print(f"wrote {path}")
    print(table)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'tensorboard'} ({len(rows)} points)")
    return rows


