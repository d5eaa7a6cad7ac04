"""Turn the benchmark's results into ``results.md`` (tables and the targets) and ``throughput.png``."""

from __future__ import annotations

from pathlib import Path


def _row_rates(r: dict) -> str:
    p = r["predictor"]
    return f"{p['median']:.1f} ({p['min']:.1f}–{p['max']:.1f})"


def markdown(results: dict) -> str:
    m, ceiling = results["machine"], results["ceiling"]
    lines = [
        f"# Throughput — {results['model']}",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores), {m.get('gpu') or 'no GPU'}; threads: {results['threads']}; "
        f"{results['versions_line']}.",
        f"Model: {results['flops_per_image_step'] / 1e9:.3f} GFLOP per image-step (torch.utils.flop_counter). "
        f"Ceiling: fp32 matmul {ceiling['gflops_median']:.1f} GFLOP/s ({ceiling['library']}, {ceiling['n']}², "
        "median of "
        f"{ceiling['repeats']}, max {ceiling['gflops_max']:.1f}; "
        + ", ".join(f"{k} {v['median']:.1f}" for k, v in ceiling["all"].items())
        + f") = {results['ceiling_img_steps_per_s']:.1f} image-steps/s. The ceiling is measured again right before "
        "each CPU row (this VM's speed drifts by ~10 % over minutes); \"of ceiling\" uses that row's measurement.",
        "",
        "| backend | batch | predictor img-steps/s, median (min–max) | GFLOP/s | ceiling GFLOP/s | of ceiling | "
        "sampling loop img-steps/s | outside predictor | DDPM-1000 img/s | DDIM-50 img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["records"]:
        if r.get("end_to_end"):
            continue
        share = "fused" if r["sampler_share"] is None else f"{100 * r['sampler_share']['median']:.1f} %"
        loop = r["loop"]["median"]
        lines.append(
            f"| {r['backend']} | {r['batch_size']} | {_row_rates(r)} | {r['gflops_per_s']:.1f} | "
            f"{r['gflops_per_s'] / r['efficiency']:.0f} | {100 * r['efficiency']:.0f} % | {loop:.1f} | "
            f"{share} | {loop / 1000:.3f} | {loop / 50:.2f} |"
        )
    for r in results["records"]:
        if r.get("end_to_end"):
            lines += ["", f"End to end ({r['backend']}, ddpm-generate equivalent, n = {r['n']}, "
                          f"batch {r['batch_size']}, "
                          f"DDIM-{r['steps']} incl. PNG writing): {r['images_per_s']:.2f} img/s measured vs "
                          f"{r['extrapolated_images_per_s']:.2f} img/s extrapolated from the loop rate at that batch."]
    if results.get("ratios"):
        lines += ["", "Predictor rate over onnx-cpu's at the same batch size: " + "; ".join(
            f"{r['backend']} batch {r['batch_size']} {r['ratio']:.2f}x" for r in results["ratios"]) + "."]
    if results.get("targets"):
        lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    if results.get("skipped"):
        lines += ["", "Not measured here: "
                  + "; ".join(f"{s['backend']} ({s['reason']})" for s in results["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    backends = sorted({r["backend"] for r in results["records"] if not r.get("end_to_end")})
    for b in backends:
        rows = sorted((r for r in results["records"] if r["backend"] == b and not r.get("end_to_end")),
                      key=lambda r: r["batch_size"])
        ax.plot([r["batch_size"] for r in rows], [r["img_steps_per_s"] for r in rows], marker="o", label=b)
    ax.axhline(results["ceiling_img_steps_per_s"], color="black", linestyle="--",
               label=f"matmul ceiling ({results['ceiling']['gflops_median']:.0f} GFLOP/s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("image-steps / s (noise predictor)")
    ax.set_title(f"{results['model']}, {results['threads']} threads")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
