"""Plot a ``dsr-kernels bench`` JSON: median time per provider, one panel per shape and mode.

python benchmarks/plot_attention.py benchmarks/results/<file>.json [out.png]
"""

import json
import sys
from pathlib import Path


def plot(json_path: str, png_path: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    env, rows = data["environment"], [r for r in data["rows"] if "median_ms" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(shapes), figsize=(4 * len(shapes), 3 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            ax.barh(
                [r["provider"] for r in sel],
                [r["median_ms"] for r in sel],
                xerr=[[r["median_ms"] - r["p20_ms"] for r in sel], [r["p80_ms"] - r["median_ms"] for r in sel]],
            )
            ax.set_title(f"{shape} {mode}", fontsize=9)
            ax.set_xlabel("ms (median, p20-p80)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"attention on {env['device_name']}, torch {env['torch']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    out = Path(png_path) if png_path else Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(plot(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
