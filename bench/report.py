"""Turn a pytest-benchmark JSON into docs/performance.md's table: each fast path against the naive
twin (or the copy, for the kernel) of its group, measured in the same run.

    python bench/report.py bench/results/latest.json [--png bench/results/latest.png]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

RATE_KEYS = ("candidates_per_s", "pairs_per_s", "latents_per_s", "gb_per_s")


def rows(data: dict) -> list[dict]:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    out = []
    for group, items in groups.items():
        naive = next((b for b in items if "[naive" in b["name"]), None)
        copy = next((b for b in items if "[copy" in b["name"]), None)
        for b in items:
            info = b.get("extra_info", {})
            rate_key = next((k for k in RATE_KEYS if k in info), None)

            def ratio(base):
                if base is None or rate_key is None or rate_key not in base.get("extra_info", {}):
                    return ""
                return f"{info[rate_key] / base['extra_info'][rate_key]:.2f}x"

            out.append(
                {
                    "group": group,
                    "name": b["name"].split("[", 1)[-1].rstrip("]"),
                    "median_ms": b["stats"]["median"] * 1e3,
                    "rate": f"{info[rate_key]:.3g} {rate_key.replace('_per_s', '/s')}" if rate_key else "",
                    "vs_base": ratio(naive),
                    "vs_copy": ratio(copy),
                    "extra": {k: v for k, v in info.items() if k not in RATE_KEYS},
                }
            )
    return out


def markdown(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    lines = [
        f"Machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores",
        "",
        "| group | variant | median | rate | vs naive | vs copy | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows(data):
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["extra"].items())
        lines.append(
            f"| {r['group']} | {r['name']} | {r['median_ms']:.1f} ms | {r['rate']} | {r['vs_base']} | {r['vs_copy']} | {notes} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--png", help="also draw the ratios as a bar chart")
    args = parser.parse_args()
    data = json.load(open(args.json))
    print(markdown(data))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ratios = [(f"{r['group']}\n{r['name']}", float(r["vs_base"][:-1])) for r in rows(data) if r["vs_base"]]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(ratios) + 1))
        ax.barh([n for n, _ in ratios], [v for _, v in ratios], color="tab:blue")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("throughput relative to the naive twin, same run")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
