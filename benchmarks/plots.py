"""PNG plots of the committed benchmark JSON (CPU, matplotlib), written to benchmarks/results/.

    python benchmarks/plots.py                  # all four
    python benchmarks/plots.py --out DIR

- plot_kernels.png: lasp's linear-attention kernels against fla, fwd+bwd (kernels.json);
- plot_scaling.png: PROJECTED tokens/s/GPU against W at fixed tokens per GPU, LASP-2 against
  LASP-1 and ring attention (scaling_projection_*.json; a measured calibration over the interim);
- plot_longest.png: PROJECTED longest trainable sequence against GPUs (memory_projection_*.json);
- plot_mom.png: the MoM layer against two plain linear-attention layers (mom JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def newest(pattern: str) -> Path | None:
    """The newest file matching `pattern` in results; measured ones before the interim."""
    files = sorted(RESULTS.glob(pattern), key=lambda p: p.stat().st_mtime)
    measured = [p for p in files if "interim" not in p.name]
    return (measured or files or [None])[-1]


def plot_kernels(path: Path, out: Path) -> Path:
    data = json.loads(path.read_text())
    rows = [r for r in data["results"] if r["mode"] == "fwd+bwd" and not r["method"].startswith("lasp-torch")]
    shapes = sorted({(r["B"], r["T"]) for r in rows}, key=lambda s: s[0] * s[1] * 10 + s[1])
    methods = ["lasp-triton plain", "fla plain", "lasp-triton g_gamma", "fla g_gamma", "lasp-triton g"]
    colors = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(methods)
    for i, (method, color) in enumerate(zip(methods, colors)):
        ms = [next((r["ms"] for r in rows if r["method"] == method and (r["B"], r["T"]) == s), None) for s in shapes]
        xs = [j + (i - len(methods) / 2 + 0.5) * width for j in range(len(shapes))]
        bars = ax.bar([x for x, m in zip(xs, ms) if m], [m for m in ms if m], width, label=method, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(shapes)), [f"B={b}, T={t // 1024}K" for b, t in shapes])
    ax.set_ylabel("fwd+bwd ms (lower is better)")
    ax.set_title(f"Linear attention kernels, bf16, H={data['H']}, D={data['D']}: lasp vs fla ({data['device']})",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    target = out / "plot_kernels.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def plot_scaling(path: Path, out: Path) -> Path:
    data = json.loads(path.read_text())
    rows = data["weak_scaling"]
    patterns = sorted({r["pattern"] for r in rows}, key=len)
    fig, axes = plt.subplots(1, len(patterns), figsize=(11, 4.2), sharey=False)
    styles = {"lasp2": ("-", "LASP-2"), "lasp1": ("--", "LASP-1"), "ring": (":", "ring attention"),
              "lasp2+log_scan": ("-.", "LASP-2 + log-depth scan")}
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    for ax, pattern in zip(axes, patterns):
        for color, L in zip(colors, sorted({r["local_tokens"] for r in rows})):
            sel = [r for r in rows if r["pattern"] == pattern and r["local_tokens"] == L]
            for method, (style, label) in styles.items():
                ax.plot([r["W"] for r in sel], [r[f"{method}_tokens_per_s_per_gpu"] / 1e3 for r in sel], style,
                        color=color, marker="o" if method == "lasp2" else None, markersize=3,
                        label=f"{label}, {L // 1024}K/GPU")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("GPUs (W), tokens per GPU fixed")
        ax.set_ylabel("PROJECTED thousand tokens/s/GPU")
        ax.set_title(f"pattern {pattern}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5)
    fig.suptitle(f"PROJECTED weak scaling of linear-llama3-1b (calibration: {_calibration_label(data)}; "
                 f"{data['hardware']['network']['name']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    target = out / "plot_scaling.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def _calibration_label(data: dict) -> str:
    source = data.get("calibration_source") or data.get("fit_source", "")
    device = (data.get("calibration_device") or data.get("fit_device", "")).split(" (")[0]
    return f"{device}, interim (derived from committed figures)" if source.startswith("interim") else device


def plot_longest(path: Path, out: Path) -> Path:
    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (pattern, card), style in zip([("L", 80), ("L", 141), ("LLLN", 80), ("LLLN", 141)],
                                      ["-o", "-s", "--o", "--s"]):
        sel = [r for r in data["rows"] if r["pattern"] == pattern and r["card_gb"] == card]
        ax.plot([r["W"] for r in sel], [r["max_tokens"] / 2 ** 20 for r in sel], style, markersize=4,
                label=f"{pattern}, {card:g} GB cards")
    ax.plot([128], [2.0], "k*", markersize=10, label="LASP-2 paper: 2048K on 128 A100-80GB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("GPUs (W)")
    ax.set_ylabel("PROJECTED longest sequence (M tokens)")
    ax.set_title(f"PROJECTED longest trainable sequence, linear-llama3-1b, checkpointing\n"
                 f"(fit: {_calibration_label(data)})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = out / "plot_longest.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def plot_mom(path: Path, out: Path) -> Path:
    data = json.loads(path.read_text())
    rows = {(r["method"], r["T"]): r for r in data["results"]}
    Ts = sorted({T for _, T in rows})
    pairs = [("lasp MoM", "plain LinearAttention", "layer, eager"),
             ("lasp MoM CUDA graph", "plain LinearAttention CUDA graph", "layer, CUDA graphs"),
             ("lasp MoM op", "linear_attention op x2", "op alone")]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(pairs)
    for i, (mom, plain, label) in enumerate(pairs):
        ratios = []
        for T in Ts:
            if (mom, T) not in rows or (plain, T) not in rows:
                ratios.append(None)
                continue
            base = rows[(plain, T)]["ms"] * (1 if "x2" in plain else 2)
            ratios.append(rows[(mom, T)]["ms"] / base)
        xs = [j + (i - len(pairs) / 2 + 0.5) * width for j in range(len(Ts))]
        bars = ax.bar([x for x, r in zip(xs, ratios) if r], [r for r in ratios if r], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(Ts)), [f"T={T // 1024}K" for T in Ts])
    ax.set_ylabel("MoM time / two plain layers' time")
    ax.set_title(f"MoM (M={data['num_memories']}, k={data['top_k']}) vs plain linear attention, fwd+bwd "
                 f"({data['device']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = out / "plot_mom.png"
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--kernels", type=Path, default=RESULTS / "kernels.json")
    parser.add_argument("--scaling", type=Path, default=None, help="default: newest scaling_projection_*.json")
    parser.add_argument("--memory", type=Path, default=None, help="default: newest memory_projection_*.json")
    parser.add_argument("--mom", type=Path, default=RESULTS / "mom_h200_2026-12-03-s4.json",
                        help="MoM benchmark JSON (default: the latest full run)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(plot_kernels, args.kernels), (plot_scaling, args.scaling or newest("scaling_projection_*.json")),
            (plot_longest, args.memory or newest("memory_projection_*.json")),
            (plot_mom, args.mom)]
    for plot, path in jobs:
        if path is None or not Path(path).exists():
            print(f"{plot.__name__}: no input JSON (run the benchmark or the model first)")
            continue
        print(f"{plot.__name__}: {Path(path).name} -> {plot(Path(path), args.out)}")


if __name__ == "__main__":
    main()
