"""Run the benchmark suites and turn pytest-benchmark's JSON into a CSV and a Markdown table.

    python benchmarks/run.py                   # everything -> benchmarks/out/{raw.json,kernels.csv,kernels.md,speedups.png}
    python benchmarks/run.py -k modality_gate  # extra arguments go to pytest
    python benchmarks/run.py --record          # also record the medians for dispatch "auto" (on a GPU)

Each row holds the median of every backend at one shape, the speedup of each over the eager reference, and
for ops with a byte floor (bytes that must cross memory at least once, at the measured copy bandwidth) the
ratio of the best fused time to that floor.

--record writes the kernel medians of this device into pill_kernels/measured_wins.json (or --record-to PATH,
for $PILL_KERNELS_MEASUREMENTS), replacing what was recorded before for this device and leaving other devices'
entries alone: dispatch "auto" takes a measured-only backend (the Triton attention kernel, the CUDA kernels)
at a call's shape only when such a record says it is the fastest there.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE_KEYS = ("op", "pass_", "variant", "batch", "seq", "image_tokens", "layers", "tokens", "image_fraction", "hidden",
              "rank", "experts", "heads", "head_dim", "dtype", "device")
# What each row's speedups are relative to: the eager reference (kernels); PyTorch's sdpa without the method's
# additions (attention: the cost of the gate / prompts shows as a speedup below 1); the plain LLaMA layer
# (decoder layer: the adapters' overhead shows as a speedup below 1); the seed formulation (training step).
BASELINES = ("reference", "sdpa", "plain-sdpa", "seed")


def run_suites(out_dir: str, pytest_args: list[str]) -> str:
    raw = os.path.join(out_dir, "raw.json")
    command = [sys.executable, "-m", "pytest", HERE, "-q", f"--benchmark-json={raw}", *pytest_args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return raw


def summarize(raw_path: str) -> tuple[list[dict], dict]:
    with open(raw_path) as f:
        raw = json.load(f)
    bandwidth = None
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    floors: dict[tuple, int] = {}
    extras: dict[tuple, dict[str, object]] = defaultdict(dict)
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        median = bench["stats"]["median"]
        if info.get("op") == "copy":
            bandwidth = info["bytes_moved"] / median
            continue
        key = tuple(info.get(k) for k in SHAPE_KEYS)
        groups[key][info["backend"]] = median
        if "floor_bytes" in info:
            floors[key] = info["floor_bytes"]
        if "peak_memory_MiB" in info:
            extras[key][f"{info['backend']}_peak_MiB"] = info["peak_memory_MiB"]
        if "tokens_per_step" in info:
            extras[key][f"{info['backend']}_tokens_per_s"] = round(info["tokens_per_step"] / median)
    rows = []
    for key, medians in groups.items():
        row = {k: v for k, v in zip(SHAPE_KEYS, key) if v is not None}
        baseline = next((b for b in BASELINES if b in medians), None)
        for backend, median in sorted(medians.items()):
            row[f"{backend}_ms"] = round(median * 1e3, 4)
            if baseline and backend != baseline:
                row[f"{backend}_speedup"] = round(medians[baseline] / median, 2)
        row.update(extras.get(key, {}))
        if key in floors and bandwidth:
            floor = floors[key] / bandwidth
            row["floor_ms"] = round(floor * 1e3, 4)
            fused = [m for b, m in medians.items() if b not in BASELINES]
            if fused:
                row["best_over_floor"] = round(min(fused) / floor, 2)
        rows.append(row)
    meta = {"machine": raw.get("machine_info", {}).get("node"), "datetime": raw.get("datetime"),
            "commit": raw.get("commit_info", {}).get("id"), "copy_GBps": bandwidth and round(bandwidth / 1e9, 1)}
    return rows, meta


def write_tables(rows: list[dict], meta: dict, out_dir: str) -> str:
    """One CSV of every row; one Markdown table per op (each op has its own shape columns)."""
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(os.path.join(out_dir, "kernels.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Measured {meta['datetime']} on {meta['machine']}, commit {meta['commit']}, device-to-device copy "
             f"bandwidth {meta['copy_GBps']} GB/s; medians in ms; speedup = baseline median / backend median (baseline: the eager "
             f"reference for kernels, sdpa without gate or prompts for gated_attention, the plain LLaMA layer for "
             f"decoder_layer, the seed formulation for training_step).", ""]
    for op in sorted({row["op"] for row in rows}):
        op_rows = [row for row in rows if row["op"] == op]
        op_columns = [c for c in columns if c != "op" and any(c in row for row in op_rows)]
        lines += [f"### {op}", "", "| " + " | ".join(op_columns) + " |", "|" + "---|" * len(op_columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in op_columns) + " |" for row in op_rows]
        lines.append("")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "kernels.md"), "w") as f:
        f.write(table)
    return table


def write_plot(rows: list[dict], out_dir: str) -> str | None:
    """A bar chart per op of each backend's speedup over its baseline (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ops = sorted({row["op"] for row in rows})
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [row for row in rows if row["op"] == op]
        backends = sorted({c[:-len("_speedup")] for row in op_rows for c in row if c.endswith("_speedup")})
        labels = [" ".join(str(row[k]) for k in ("pass_", "variant", "batch", "seq", "tokens", "image_fraction")
                           if k in row) for row in op_rows]
        width = 0.8 / max(len(backends), 1)
        for i, backend in enumerate(backends):
            ax.bar([j + i * width for j in range(len(op_rows))],
                   [row.get(f"{backend}_speedup", 0) for row in op_rows], width, label=backend)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(op_rows))], labels, rotation=60, ha="right",
                      fontsize=7)
        ax.set_title(op)
        ax.set_ylabel("speedup over baseline")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "speedups.png")
    fig.savefig(path, dpi=120)
    return path


def measurement_entries(rows: list[dict], meta: dict) -> dict[str, list[dict]]:
    """Per op, one entry per measured shape: its dispatch features and each dispatch backend's median in ms
    (backends that are baselines only, such as sdpa, are left out: auto cannot pick them). Rows that differ
    only in what dispatch does not key on (the image-token layout) are averaged."""
    sys.path.insert(0, os.path.dirname(HERE))
    from pill_kernels.dispatch import BACKENDS, SHAPE_FEATURES

    merged: dict[tuple, dict] = {}
    for row in rows:
        op = row["op"]
        if op not in SHAPE_FEATURES or not str(row.get("device", "")).startswith("cuda"):
            continue
        exact, near = SHAPE_FEATURES[op]
        features = {"pass": row.get("pass_")}
        features.update({k: row[k] for k in exact + near if k in row and k != "pass"})
        times = {b: row[f"{b}_ms"] for b in BACKENDS if f"{b}_ms" in row}
        if len(times) < 2:
            continue
        key = (op,) + tuple(sorted(features.items()))
        slot = merged.setdefault(key, {"op": op, "features": features, "times": {}})
        for backend, ms in times.items():
            slot["times"].setdefault(backend, []).append(ms)
    entries: dict[str, list[dict]] = {}
    for slot in merged.values():
        entry = dict(slot["features"])
        entry["median_ms"] = {b: round(sum(v) / len(v), 4) for b, v in sorted(slot["times"].items())}
        entry["measured"] = f"{meta.get('datetime')} commit {meta.get('commit')}"
        entries.setdefault(slot["op"], []).append(entry)
    return entries


def record_measurements(entries: dict[str, list[dict]], device_name: str, path: str) -> None:
    """Replace `device_name`'s entries in the measurements file at `path` (written atomically)."""
    data: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    for op, op_entries in entries.items():
        data.setdefault(op, {})[device_name] = op_entries
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    parser.add_argument("--from-json", help="summarize an existing pytest-benchmark JSON instead of running")
    parser.add_argument("--record", action="store_true",
                        help="record this device's kernel medians for dispatch 'auto' (see the module docstring)")
    parser.add_argument("--record-to", default=os.path.join(os.path.dirname(HERE), "pill_kernels",
                                                              "measured_wins.json"))
    parser.add_argument("--device-name", help="the GPU's name as torch.cuda.get_device_name() gives it "
                                              "(default: this machine's GPU)")
    args, pytest_args = parser.parse_known_args(argv)
    os.makedirs(args.out, exist_ok=True)
    raw = args.from_json or run_suites(args.out, pytest_args)
    rows, meta = summarize(raw)
    print(write_tables(rows, meta, args.out))
    plot = write_plot(rows, args.out)
    if plot:
        print(f"plot: {plot}")
    if args.record:
        name = args.device_name
        if name is None:
            import torch

            if not torch.cuda.is_available():
                parser.error("--record needs a GPU (or --device-name with --from-json of a GPU run)")
            name = torch.cuda.get_device_name(0)
        entries = measurement_entries(rows, meta)
        if not entries:
            parser.error("--record: no GPU kernel rows with two or more dispatch backends to record")
        record_measurements(entries, name, args.record_to)
        print(f"recorded {sum(map(len, entries.values()))} measured shapes for {name} in {args.record_to}")


if __name__ == "__main__":
    main()
