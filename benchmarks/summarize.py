"""Markdown table of a pytest-benchmark JSON file: median per op, case, backend and pass, and its ratio to the
reference (autograd through pill_kernels.reference) and to the eager backend measured in the same run.

    PILL_BENCH_FULL=1 python -m pytest benchmarks --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json
"""
import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    rows = defaultdict(dict)  # (op, case, pass) -> backend -> (median s, extra_info)
    for bench in data["benchmarks"]:
        case, backend, which = bench["param"].rsplit("-", 2)  # ids made by bench_common.params
        op = bench["name"].split("[")[0].removeprefix("test_")
        rows[(op, case, which)][backend] = (bench["stats"]["median"], bench.get("extra_info", {}))
    print("| op | case | pass | backend | median ms | vs reference | vs eager |")
    print("|---|---|---|---|---|---|---|")
    for (op, case, which), by_backend in sorted(rows.items()):
        ref = by_backend.get("reference", (None,))[0]
        eager = by_backend.get("eager", (None,))[0]
        for backend, (median, _) in by_backend.items():
            ratio = lambda base: f"{base / median:.2f}x" if base else "-"  # noqa: E731
            print(f"| {op} | {case} | {which} | {backend} | {median * 1e3:.2f} | {ratio(ref)} | {ratio(eager)} |")
    info = data.get("machine_info", {})
    print(f"\nmachine: {info.get('cpu', {}).get('brand_raw', '?')}, python {info.get('python_version', '?')}; "
          f"commit {data.get('commit_info', {}).get('id', '?')[:10]}; {data.get('datetime', '?')}")


if __name__ == "__main__":
    main(sys.argv[1])
