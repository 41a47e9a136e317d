"""Reward functions, selected by name from config and summed with weights.

A reward function maps ``images`` (``[B, 3, H, W]`` float in ``[0, 1]``) and their ``prompts`` to ``[B]`` float32
rewards. Offline ones (no model needed): ``jpeg_compressibility``, ``jpeg_incompressibility`` (DDPO's), ``brightness``
and ``color``. Model-based ones load a model from a local folder given in the reward's options and fail with a
clear message when it is missing: ``pickscore``, ``aesthetic``, ``ocr``, ``vlm_ocr`` (a Qwen-VL vision-language
model judging whether the image shows the prompt's quoted text, as verl-omni's colocated OCR reward model does).

    reward = build_reward({"jpeg_compressibility": 1.0, "brightness": 0.5}, {"brightness": {"target": 0.7}})
    total, parts = reward(images, prompts)
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "REWARD_REGISTRY",
    "to_pil_images",
    "load_clip_image_processor",
    "clip_pixel_values",
    "register_reward",
    "build_reward",
    "check_reward_config",
    "WeightedReward",
    "AsyncRewardRunner",
]

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
REWARD_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable:
    """Decorator: register a reward factory ``factory(**options) -> fn(images, prompts) -> [B] tensor``."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARD_REGISTRY[name] = factory
        return factory

    return deco


def _to_uint8_hwc(images: torch.Tensor):
    """``[B, 3, H, W]`` floats in ``[0, 1]`` to ``[B, H, W, 3]`` uint8 numpy, as FlowGRPO's reward functions convert
    them: ``(x * 255).round().clamp(0, 255)``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil_images(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` floats in ``[0, 1]`` to RGB PIL images: uint8 first, then PIL, the input the reference
    scorers (FlowGRPO's PickScore and aesthetic rewards) hand to their CLIP processors."""
    from PIL import Image

    return [Image.fromarray(pixels) for pixels in _to_uint8_hwc(images)]


def _jpeg_bits_per_pixel(images: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    sizes = []
    for pixels in _to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() * 8 / (pixels.shape[0] * pixels.shape[1]))
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """DDPO's JPEG incompressibility: the JPEG size, in bits per pixel (resolution-independent)."""

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return _jpeg_bits_per_pixel(images, quality)

    return fn


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> RewardFn:
    """DDPO's JPEG compressibility: minus the JPEG size in bits per pixel (smaller files score higher)."""

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -_jpeg_bits_per_pixel(images, quality)

    return fn


@register_reward("brightness")
def brightness(target: float = 0.8) -> RewardFn:
    """Minus the distance of the mean luminance (Rec. 601) to ``target`` in ``[0, 1]``."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"brightness target must be in [0, 1], got {target}")
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        luminance = (images.detach().float().cpu().clamp(0, 1) * weights).sum(dim=1)
        return -(luminance.mean(dim=(1, 2)) - target).abs()

    return fn


@register_reward("color")
def color(rgb: Sequence[float] = (1.0, 0.0, 0.0)) -> RewardFn:
    """Minus the mean Euclidean distance of the pixels to the colour ``rgb`` (each channel in ``[0, 1]``)."""
    target = torch.tensor([float(c) for c in rgb]).view(1, 3, 1, 1)
    if target.numel() != 3 or not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError(f"color rgb must be 3 values in [0, 1], got {list(rgb)}")

    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dist = (images.detach().float().cpu().clamp(0, 1) - target).pow(2).sum(dim=1).sqrt()
        return -dist.mean(dim=(1, 2))

    return fn


def _require_path(reward: str, key: str, path: str | None, hint: str) -> str:
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"reward {reward!r} needs a local model: set reward.options.{reward}.{key}=/path/to/{hint} "
            f"(got {path!r}; nothing is downloaded)"
        )
    return path


# PickScore's and CLIP's text length (the processor call of PickScore's model card and FlowGRPO's scorer).
CLIP_MAX_TEXT_TOKENS = 77


def load_clip_image_processor(path: str) -> Any:
    """The CLIP image preprocessing of the folder at ``path``, run with the PIL backend.

    The reference scorers were written against transformers' PIL-based ``CLIPImageProcessor``: bicubic PIL resize
    of the shortest edge, center crop, rescale by 1/255, normalisation with the folder's mean/std. transformers 5
    loads a torchvision backend instead when torchvision is installed, whose tensor resize rounds differently, so
    the PIL class is asked for by name (``CLIPImageProcessorPil``; transformers 4's ``CLIPImageProcessor`` is it).
    """
    try:
        from transformers import CLIPImageProcessorPil as processor_cls
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as processor_cls
    return processor_cls.from_pretrained(path)


def clip_pixel_values(image_processor: Any, images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, S, S]`` float32 CLIP input of ``images`` (``[B, 3, H, W]`` in ``[0, 1]``), via uint8 PIL images."""
    return image_processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"]


@register_reward("pickscore")
def pickscore(model_path: str | None = None, processor_path: str | None = None, device: str = "cpu") -> RewardFn:
    """PickScore as its model card and FlowGRPO compute it, divided by 26 as FlowGRPO does.

    ``logit_scale.exp()`` times the cosine similarity of the L2-normalised CLIP image and text embeddings. Images
    are quantised to uint8 and preprocessed by the processor folder (``processor_path``, default ``model_path``;
    FlowGRPO uses ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s) with the PIL backend; prompts are padded and
    truncated to 77 tokens.
    """
    from transformers import AutoTokenizer, CLIPModel

    model_path = _require_path("pickscore", "model_path", model_path, "PickScore_v1")
    processor_path = processor_path or model_path
    image_processor = load_clip_image_processor(processor_path)
    tokenizer = AutoTokenizer.from_pretrained(processor_path)
    model = CLIPModel.from_pretrained(model_path).eval().to(device)

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixel_values = clip_pixel_values(image_processor, images).to(device)
        text = tokenizer(
            list(prompts), padding=True, truncation=True, max_length=CLIP_MAX_TEXT_TOKENS, return_tensors="pt"
        ).to(device)
        image_embeds = _features(model.get_image_features(pixel_values=pixel_values))
        text_embeds = _features(model.get_text_features(**text))
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (image_embeds * text_embeds).sum(dim=-1)
        return (scores / 26).float().cpu()

    return fn


def _features(out: Any) -> torch.Tensor:
    """CLIP feature getters return a tensor or (newer transformers) an output object with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor's MLP, applied to L2-normalised CLIP image embeddings."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


@register_reward("aesthetic")
def aesthetic(clip_path: str | None = None, head_path: str | None = None, device: str = "cpu") -> RewardFn:
    """LAION aesthetic score as FlowGRPO computes it: the MLP head on L2-normalised CLIP ViT-L/14 image embeddings.

    ``clip_path`` is a local ``openai/clip-vit-large-patch14`` folder (its processor preprocesses, PIL backend, from
    uint8 images); ``head_path`` the predictor's weights (``.pth`` or ``.safetensors``).
    """
    from transformers import CLIPModel

    clip_path = _require_path("aesthetic", "clip_path", clip_path, "clip-vit-large-patch14")
    head_path = _require_path("aesthetic", "head_path", head_path, "sac+logos+ava1-l14-linearMSE.pth")
    image_processor = load_clip_image_processor(clip_path)
    model = CLIPModel.from_pretrained(clip_path).eval().to(device)
    head = _AestheticHead(model.config.projection_dim)
    if head_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(head_path)
    else:
        state = torch.load(head_path, map_location="cpu", weights_only=True)
    head.load_state_dict(state)
    head = head.eval().to(device)

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixel_values = clip_pixel_values(image_processor, images).to(device)
        embeds = _features(model.get_image_features(pixel_values=pixel_values))
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        return head(embeds).squeeze(-1).float().cpu()

    return fn


def edit_similarity(predicted: str, target: str) -> float:
    """``1 - Levenshtein(predicted, target) / max(len)``, case- and space-insensitive; 1.0 for two empty strings."""
    a = re.sub(r"\s+", "", predicted.lower())
    b = re.sub(r"\s+", "", target.lower())
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def quoted_text(prompt: str) -> str:
    """The text an OCR prompt asks for: what stands between the first pair of double quotes (else the prompt)."""
    match = re.search(r'"([^"]*)"', prompt)
    return match.group(1) if match else prompt


@register_reward("ocr")
def ocr(model_path: str | None = None, device: str = "cpu", max_new_tokens: int = 32) -> RewardFn:
    """OCR accuracy: a local transformers OCR model (e.g. TrOCR) reads the image; reward = edit similarity to the
    quoted text of the prompt."""
    from transformers import AutoProcessor, VisionEncoderDecoderModel

    model_path = _require_path("ocr", "model_path", model_path, "trocr-base-printed")
    processor = AutoProcessor.from_pretrained(model_path)
    model = VisionEncoderDecoderModel.from_pretrained(model_path).eval().to(device)

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        inputs = processor(images=list(_to_uint8_hwc(images)), return_tensors="pt").to(device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        texts = processor.batch_decode(ids, skip_special_tokens=True)
        return torch.tensor([edit_similarity(t, quoted_text(p)) for t, p in zip(texts, prompts)], dtype=torch.float32)

    return fn


# The Qwen-VL chat format: one user turn holding the image and the question, then the assistant's turn.
_QWEN_VL_TURN = ("<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n"
                 "<|im_start|>assistant\n")
VLM_OCR_QUESTION = 'Does this image show the text "{text}"? Answer yes or no.'


@register_reward("vlm_ocr")
def vlm_ocr(
    model_path: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    dtype: str | None = None,
    question: str = VLM_OCR_QUESTION,
) -> RewardFn:
    """OCR-style reward from a local Qwen-VL vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL folders, e.g.
    Qwen3-VL-8B-Instruct, the size of verl-omni's colocated OCR reward model).

    Each image is asked ``question`` about the prompt's quoted text (:func:`quoted_text`) in the Qwen-VL chat
    format; one forward (no generation) gives the next-token logits of the assistant's answer, and the reward is
    ``P(yes) = softmax(logit_yes, logit_no)[0]`` in ``[0, 1]``. Images are quantised to uint8 and preprocessed by the
    folder's image processor (PIL backend); ``batch_size`` images per forward, text right-padded, so a sample's
    score does not depend on the others in its batch beyond kernel rounding. ``dtype``: ``bfloat16`` /
    ``float32`` (default: bfloat16 on CUDA, float32 elsewhere).
    """
    import inspect

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    try:
        from transformers import Qwen2VLImageProcessorPil as processor_cls
    except ImportError:  # transformers 4
        from transformers import Qwen2VLImageProcessor as processor_cls

    model_path = _require_path("vlm_ocr", "model_path", model_path, "Qwen3-VL-8B-Instruct")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"reward.options.vlm_ocr.batch_size must be an int >= 1, got {batch_size!r}")
    if "{text}" not in question:
        raise ValueError(f"reward.options.vlm_ocr.question must contain {{text}}, got {question!r}")
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"reward.options.vlm_ocr.dtype must be bfloat16, float16 or float32, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    image_processor = processor_cls.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch_dtype).eval().to(device)
    image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    answers = [tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no")]
    if answers[0] == answers[1]:
        raise ValueError(f"the tokenizer of {model_path!r} starts 'yes' and 'no' with the same token")
    base = model.model
    head = model.get_output_embeddings()
    answer_rows = head.weight[answers]  # [2, hidden]: only the two answers' logits are needed
    answer_bias = head.bias[answers] if getattr(head, "bias", None) is not None else None
    takes_mm_types = "mm_token_type_ids" in inspect.signature(base.forward).parameters
    merge = int(getattr(image_processor, "merge_size", 2))

    @torch.no_grad()
    def fn(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"vlm_ocr got {images.shape[0]} images and {len(prompts)} prompts")
        scores = []
        for lo in range(0, len(prompts), batch_size):
            pixels = image_processor(images=to_pil_images(images[lo : lo + batch_size]), return_tensors="pt")
            grid = pixels["image_grid_thw"]
            counts = (grid.prod(dim=-1) // merge**2).tolist()
            texts = [
                _QWEN_VL_TURN.format(image=image_token * n, question=question.format(text=quoted_text(p)))
                for n, p in zip(counts, prompts[lo : lo + batch_size])
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            extra = {"mm_token_type_ids": (ids == model.config.image_token_id).long()} if takes_mm_types else {}
            hidden = base(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=pixels["pixel_values"].to(device, torch_dtype),
                image_grid_thw=grid.to(device),
                **extra,
            ).last_hidden_state
            last = hidden[torch.arange(len(ids), device=hidden.device), mask.sum(dim=1) - 1]  # the answer position
            logits = last @ answer_rows.t()
            if answer_bias is not None:
                logits = logits + answer_bias
            scores.append(logits.float().softmax(dim=-1)[:, 0].cpu())
        return torch.cat(scores)

    return fn


def check_reward_config(weights: dict[str, float], options: dict[str, dict] | None = None) -> None:
    """Fail before any work on unknown reward names, bad weights or options for rewards not used."""
    if not weights:
        raise ValueError(f"reward.functions is empty; pick some of {sorted(REWARD_REGISTRY)}")
    unknown = sorted(set(weights) - set(REWARD_REGISTRY))
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; available: {sorted(REWARD_REGISTRY)}")
    for name, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ValueError(f"reward weight of {name!r} must be a number, got {weight!r}")
    stray = sorted(set(options or {}) - set(weights))
    if stray:
        raise ValueError(f"reward.options has entries for rewards not in reward.functions: {stray}")


@dataclass
class WeightedReward:
    """The weighted sum of several reward functions."""

    fns: dict[str, RewardFn]
    weights: dict[str, float]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(total [B], {name: [B]})``."""
        parts = {}
        for name, fn in self.fns.items():
            value = torch.as_tensor(fn(images, prompts), dtype=torch.float32).flatten()
            if value.shape != (images.shape[0],):
                raise ValueError(f"reward {name!r} returned shape {tuple(value.shape)} for {images.shape[0]} images")
            bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"reward {name!r} returned NaN/Inf for {len(bad)} of {images.shape[0]} images "
                                 f"(first at index {bad[0]}: {float(value[bad[0]])})")
            parts[name] = value
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts


def build_reward(weights: dict[str, float], options: dict[str, dict] | None = None) -> WeightedReward:
    """Instantiate the named rewards (with their options) into one :class:`WeightedReward`."""
    options = dict(options or {})
    check_reward_config(weights, options)
    fns = {}
    for name in weights:
        try:
            fns[name] = REWARD_REGISTRY[name](**dict(options.get(name) or {}))
        except TypeError as err:
            raise ValueError(f"bad options for reward {name!r}: {err}") from err
    return WeightedReward(fns=fns, weights={k: float(v) for k, v in weights.items()})


class AsyncRewardRunner:
    """Computes rewards off the training thread, so scoring one rollout chunk overlaps sampling the next.

    ``backend="thread"`` runs the reward in a worker thread of this process; ``backend="ray"`` in a Ray actor
    (started on first use; it builds the reward there, so a reward model can live on another device).
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict] | None = None, backend: str = "thread"):
        if backend not in ("thread", "ray", "sync"):
            raise ValueError(f"reward backend must be 'thread', 'ray' or 'sync', got {backend!r}")
        check_reward_config(weights, options)
        self.backend = backend
        if backend == "ray":
            import ray

            actor = ray.remote(_RewardActor)
            self._actor = actor.options(num_cpus=1).remote(dict(weights), dict(options or {}))
            self._reward = None
        else:
            self._reward = build_reward(weights, options)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdr-reward") if backend != "sync" else None

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> Future:
        """Start scoring; the future resolves to ``(total [B], {name: [B]})``."""
        if self.backend == "ray":
            ref = self._actor.score.remote(images, list(prompts))
            import ray

            return self._pool.submit(ray.get, ref)
        if self._pool is None:
            future: Future = Future()
            future.set_result(self._reward(images, prompts))
            return future
        return self._pool.submit(self._reward, images, list(prompts))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.backend == "ray":
            import ray

            ray.kill(self._actor)


class _RewardActor:
    def __init__(self, weights: dict[str, float], options: dict[str, dict]):
        self.reward = build_reward(weights, options)

    def score(self, images: torch.Tensor, prompts: list[str]):
        return self.reward(images, prompts)
