"""Plot `bench/attention.py` results: the compare table (latency, tokens/s, peak memory per impl and
shape) and, when present, the decode sweep (fraction of copy bandwidth per shape) as PNGs.

    python bench/plot_attention.py /tmp/attn/attention_all.json [--out /tmp/attn]
    python bench/plot_attention.py /tmp/attn          # every attention_*.json in the directory
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

IMPL_ORDER = ("naive", "sdpa", "fa2", "xformers", "flash_attn", "ours")


def _title(env: dict) -> str:
    return f"{env.get('device', '?')} | torch {env.get('torch', '?')} | {env.get('date', '')}"


def _shape(r: dict) -> tuple[int, int, int]:
    return r["batch"], r["tokens"], r["head_dim"]


def plot_compare(rows: list[dict], env: dict, path: Path) -> None:
    """Three panels (latency, tokens/s, peak MiB), bars grouped by shape, one colour per impl."""
    ok = [r for r in rows if "error" not in r]
    shapes = list(dict.fromkeys(_shape(r) for r in ok))
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in ok)]
    impls += sorted({r["impl"] for r in ok} - set(impls))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(impls))
    panels = (("ms", "latency (ms, log)", True), ("tokens_per_s", "tokens/s (log)", True),
              ("peak_mib", "peak memory (MiB, log)", True))  # fmt: skip
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for j, impl in enumerate(impls):
            vals = []
            for s in shapes:
                hit = [r[key] for r in ok if r["impl"] == impl and _shape(r) == s]
                vals.append(hit[0] if hit and hit[0] > 0 else float("nan"))  # nan: no bar
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, vals, width, label=impl)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{b}x{n}\nd{d}" for b, n, d in shapes])
        ax.set_ylabel(label)
        has_values = any(r.get(key, 0) > 0 for r in ok)  # e.g. no peak memory without CUDA
        if log and has_values:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("causal attention, same inputs and run: " + _title(env))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decode(rows: list[dict], env: dict, path: Path) -> None:
    """Fraction of copy bandwidth per (batch, context) for ours and each peer."""
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    series: dict[str, list[float]] = {"ours": [r["ours_frac"] for r in rows]}
    for r in rows:
        for name in r["peers"]:
            series.setdefault(name, [])
    for name in list(series)[1:]:
        series[name] = [r["peers"].get(name, {}).get("frac", 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows) * len(series) / 2), 4.8))
    width = 0.8 / len(series)
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, vals, width, label=name)
    ax.axhline(0.9, color="k", linestyle="--", linewidth=0.8, label="0.9 target")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right")
    ax.set_ylabel("fraction of copy bandwidth")
    ax.set_ylim(0, 1.1)
    ax.legend(ncol=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("paged decode attention (batch x context): " + _title(env))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, help="a JSON file from bench/attention.py, or its --out")
    p.add_argument("--out", type=Path, help="directory for the PNGs (default: beside the JSON)")
    args = p.parse_args(argv)
    files = (
        sorted(args.results.glob("attention_*.json")) if args.results.is_dir() else [args.results]
    )
    if not files:
        raise SystemExit(f"{args.results}: no attention_*.json found")
    for f in files:
        data = json.loads(f.read_text())
        out_dir = args.out or f.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        env = data.get("env", {})
        if data.get("compare"):
            path = out_dir / f"{f.stem}_compare.png"
            plot_compare(data["compare"], env, path)
            print(f"wrote {path}")
        if data.get("decode"):
            path = out_dir / f"{f.stem}_decode.png"
            plot_decode(data["decode"], env, path)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
