"""Fail if `pip install ARGS` would replace the installed torch or triton.

    python .ci/keeps_torch.py --no-build-isolation ".[demo]"

Runs pip's dry run with the same interpreter and reads its installation report. pill-kernels builds against the
torch it finds, so an install that swaps torch (as a capped install_requires once did: issue 27) breaks the
user's environment; this is the check that it no longer happens."""
import json
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version

GUARDED = ("torch", "triton")


def main(pip_args: list[str]) -> int:
    installed = {}
    for name in GUARDED:
        try:
            installed[name] = version(name)
        except PackageNotFoundError:
            pass
    if "torch" not in installed:
        print("keeps_torch: torch is not installed here, nothing to keep", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report.name,
                        *pip_args], check=True)
        plan = json.load(open(report.name))["install"]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in plan}
    replaced = {name: (installed[name], planned[name]) for name in installed if name in planned}
    print(f"keeps_torch: `pip install {' '.join(pip_args)}` would install {len(planned)} packages; installed: "
          + ", ".join(f"{name} {v}" for name, v in installed.items()))
    if replaced:
        for name, (old, new) in replaced.items():
            print(f"keeps_torch: it would replace {name} {old} with {new}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
