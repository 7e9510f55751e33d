"""From a GPU benchmark run to dispatch "auto": benchmarks/run.py --record turns pytest-benchmark medians into
measurement records, and auto then picks per shape from them (a pretend GPU name; no GPU needed)."""
import importlib.util
import json
import os

import torch

import pill_kernels as pk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(backend, median_s, **info):
    info = dict(op="gated_attention", backend=backend, pass_="forward_backward", variant="gate", heads=32,
                head_dim=128, dtype="torch.bfloat16", device="cuda", **info)
    return {"extra_info": info, "stats": {"median": median_s}}


def test_recorded_gpu_medians_drive_auto_per_shape(tmp_path, monkeypatch):
    run = _run_module()
    raw = {"datetime": "2026-11-23T00:00:00", "commit_info": {"id": "abc"}, "machine_info": {"node": "gpu"},
           "benchmarks": [
               # Short sequences: the two-launch sdpa path (eager op) wins; long ones: the fused kernel.
               _bench("sdpa", 1.0e-3, batch=4, seq=512), _bench("eager", 1.1e-3, batch=4, seq=512),
               _bench("two_launch", 1.2e-3, batch=4, seq=512), _bench("triton", 1.3e-3, batch=4, seq=512),
               _bench("sdpa", 9.0e-3, batch=1, seq=8192), _bench("eager", 11.0e-3, batch=1, seq=8192),
               _bench("triton", 9.5e-3, batch=1, seq=8192),
               # CPU rows are never recorded.
               dict(_bench("triton", 1.0, batch=1, seq=19), extra_info=dict(
                   _bench("triton", 1.0, batch=1, seq=19)["extra_info"], device="cpu")),
           ]}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    rows, meta = run.summarize(str(tmp_path / "raw.json"))
    entries = run.measurement_entries(rows, meta)
    assert len(entries["gated_attention"]) == 2
    short = next(e for e in entries["gated_attention"] if e["seq"] == 512)
    assert short["median_ms"] == {"eager": 1.1, "triton": 1.3}  # baselines auto cannot pick are left out
    assert short["pass"] == "forward_backward" and short["variant"] == "gate" and "abc" in short["measured"]
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"_comment": "kept", "gated_attention": {"Old GPU": [short]}}))
    run.record_measurements(entries, "Toy GPU", str(path))
    data = json.loads(path.read_text())
    assert data["_comment"] == "kept" and data["gated_attention"]["Old GPU"] == [short]
    assert len(data["gated_attention"]["Toy GPU"]) == 2

    monkeypatch.setattr(pk.dispatch, "_measurements_cache", {})
    monkeypatch.setenv("PILL_KERNELS_MEASUREMENTS", str(path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Toy GPU")
    kernels = dict(pk.dispatch._registry["gated_attention"])
    # Stand-ins that can "run" on cuda here; only the choice is under test.
    for name in ("eager", "triton"):
        real = kernels.get(name) or kernels["eager"]
        kernels[name] = pk.dispatch.Kernel(real.forward, real.backward, lambda d: None, lambda d: None,
                                           name == "triton")
    monkeypatch.setitem(pk.dispatch._registry, "gated_attention", kernels)
    call = {"pass": "forward_backward", "dtype": "torch.bfloat16", "variant": "gate", "heads": 32, "head_dim": 128}
    assert pk.explain("gated_attention", "cuda", shape=dict(call, batch=8, seq=512))[0] == "eager"
    chosen, why = pk.explain("gated_attention", "cuda", shape=dict(call, batch=1, seq=16384))
    assert chosen == "triton" and "seq=8192" in why
    # LLaMA-Adapter V2's prompt branch was not measured here: the fused kernel is not picked for it.
    assert pk.explain("gated_attention", "cuda", shape=dict(call, variant="prompt", batch=1, seq=8192))[0] == "eager"
