"""What `pip install` built: pill_kernels._C imports and every compiled op has a kernel for each device the
build claims. A CPU torch gives the C++ kernels; a CUDA torch with a toolkit (CUDA_HOME) gives CUDA kernels too,
built and registered without a GPU. PILL_KERNELS_EXPECT_CUDA_BUILD=1 (CI's CUDA-torch environment) turns the
skip of a build without CUDA into a failure."""
import os

import pytest
import torch

import pill_kernels

EXPECT_CUDA = os.environ.get("PILL_KERNELS_EXPECT_CUDA_BUILD") == "1"
COMPILED_OPS = [f"{op}_{direction}" for op in ("routed_glu_adapter", "soft_routed_adapter", "modality_gate")
                for direction in ("forward", "backward")]


def _built():
    try:
        from pill_kernels import _C  # noqa: F401
    except ImportError as exc:
        if EXPECT_CUDA:
            pytest.fail(f"pill_kernels._C does not import: {exc}")
        pytest.skip(f"the extension is not built: {exc}")
    return pill_kernels.extension_info()


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pill_kernels_C::{op}", key)


def test_every_compiled_op_has_a_cpu_kernel():
    _built()
    for op in COMPILED_OPS:
        assert _has_kernel(op, "CPU"), f"pill_kernels_C::{op} has no CPU kernel"


def test_a_cuda_build_registers_cuda_kernels_for_every_op():
    info = _built()
    if "CUDA kernels" not in info:
        if EXPECT_CUDA:
            pytest.fail(f"expected a CUDA build (PILL_KERNELS_EXPECT_CUDA_BUILD=1), got: {info}")
        pytest.skip(f"built without CUDA: {info}")
    assert f"CUDA {torch.version.cuda}" in info, info
    for op in COMPILED_OPS:
        assert _has_kernel(op, "CUDA"), f"pill_kernels_C::{op} has no CUDA kernel"
    # Without a GPU the backend says why it cannot run rather than failing at launch.
    if not torch.cuda.is_available():
        assert "cuda" not in pill_kernels.available_backends("routed_glu_adapter", "cpu")


def _import_pill_kernels_in(directory, pythonpath=""):
    """`python -c "import pill_kernels"` run from `directory`, as a user runs README's check command: what it
    printed to stdout and stderr."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PILL_KERNELS_SKIP_EXT")}
    env["PYTHONPATH"] = str(pythonpath)
    # An editable install of this checkout adds a finder that would resolve pill_kernels._C of the copy to the
    # checkout's built extension: drop it, so the copy is imported alone as in a regular environment.
    script = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
              "getattr(f, '__module__', '')]; import pill_kernels; print('INFO:', pill_kernels.extension_info())")
    run = subprocess.run([sys.executable, "-c", script], cwd=directory, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout, run.stderr


def _copy_of_the_package(to):
    """pill_kernels's Python files copied to `to`/pill_kernels, without the compiled extension."""
    import shutil

    source = os.path.dirname(pill_kernels.__file__)
    shutil.copytree(source, to / "pill_kernels", ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))


def test_a_source_checkout_without_the_extension_says_so_and_what_to_do(tmp_path):
    checkout = tmp_path / "pill-kernels"
    _copy_of_the_package(checkout)
    (checkout / "setup.py").write_text("# the checkout's build script\n")
    (checkout / "csrc").mkdir()
    out, err = _import_pill_kernels_in(checkout)
    assert "SourceTreeImportWarning" in err and str(checkout) in err, err
    assert "pip install --no-build-isolation -e ." in err, err
    info = out.split("INFO:", 1)[1]
    assert "is not built" in info and f"imported from the source checkout {checkout}" in info, info

    # With the package installed elsewhere, the note names the installed copy that the checkout hides.
    site = tmp_path / "site-packages"
    _copy_of_the_package(site)
    dist_info = site / "pill_kernels-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: pill-kernels\nVersion: 0.1.0\n")
    out, err = _import_pill_kernels_in(checkout, pythonpath=site)
    assert f"the pill-kernels installed at {site / 'pill_kernels'} is hidden by it" in err, err
    assert f"imported from the source checkout {checkout}" in out, out


def test_an_installed_package_without_the_extension_gives_no_source_checkout_note(tmp_path):
    site = tmp_path / "site-packages"
    _copy_of_the_package(site)
    out, err = _import_pill_kernels_in(tmp_path, pythonpath=site)
    assert "SourceTreeImportWarning" not in err, err
    assert "is not built" in out and "source checkout" not in out, out
