"""Build tiny, randomly initialised models (Qwen-Image, SD3.5, CLIP) as normal diffusers / transformers folders,
offline.

Tests, examples and CI use them in place of the real checkpoints: each folder has the same layout and classes as
the real one (``Qwen/Qwen-Image``: transformer, VAE, Qwen2.5-VL text encoder, Qwen2 tokenizer, flow-matching
scheduler; ``stabilityai/stable-diffusion-3.5-medium``: MMDiT-X transformer, VAE, CLIP-L, CLIP-G and T5 encoders
with their tokenizers, flow-matching scheduler) and is loaded by exactly the code that loads a real checkpoint.
Nothing is downloaded: tokenizers are built here from in-memory vocabularies.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

__all__ = [
    "make_tiny_qwenimage",
    "tiny_qwenimage_path",
    "build_tiny_tokenizer",
    "make_tiny_sd3",
    "tiny_sd3_path",
    "build_tiny_clip_tokenizer",
    "build_tiny_t5_tokenizer",
    "make_tiny_clip",
    "make_qwen3_vl",
    "TINY_QWEN3_VL_TEXT",
    "TINY_QWEN3_VL_VISION",
    "TINY_QWENIMAGE_DIMS",
    "TINY_SD3_DIMS",
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "SD3_SCHEDULER_CONFIG",
]

# Qwen-Image's flow-matching scheduler settings (dynamic shift, exponential time shift, terminal sigma).
QWEN_IMAGE_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)

# Dimensions in the spirit of diffusers' own QwenImage pipeline tests, a little wider so images vary.
TINY_QWENIMAGE_DIMS = {
    "transformer": dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ),
    "vae": dict(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ),
    "text_hidden_size": 32,
}

# SD3 / SD3.5's flow-matching scheduler settings (the published scheduler_config.json: static shift 3).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

# SD3.5-Medium's geometry at toy width: an MMDiT-X transformer (dual attention in its first block, RMS QK-norm,
# the last block text-pre-only), a 3-level VAE (factor 4), two CLIP text encoders whose hidden states concatenate
# to T5's width (= the transformer's joint_attention_dim) and whose projections concatenate to the pooled width.
TINY_SD3_DIMS = {
    "transformer": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    ),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
}

# The system prompt QwenImagePipeline wraps every prompt in. The pipeline drops the first
# `prompt_template_encode_start_idx` (34) tokens, the length of this prefix under Qwen's real tokenizer;
# the tiny tokenizer below is built so that the prefix is exactly 34 tokens under it too.
_TEMPLATE_PREFIX_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\nassistant\n"
)
_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
_EXTRA_WORDS = "a an the red green blue cat dog photo of on in with sky city tree house car flower bird"


def _byte_alphabet() -> dict[int, str]:
    """GPT-2 style byte -> printable character table used by byte-level BPE tokenizers."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` with whole-word merges for the chat template and a few common words.

    Any text tokenizes (bytes are the fallback), and the Qwen-Image chat-template prefix is exactly 34 tokens,
    as under the real tokenizer.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {"<|endoftext|>": 0}
    for b in range(256):
        vocab.setdefault(alphabet[b], len(vocab))
    words = set(re.findall(r"[^\r\n\w]?[A-Za-z]+", _TEMPLATE_PREFIX_TEXT))
    words |= {" " + w for w in _EXTRA_WORDS.split()} | set(_EXTRA_WORDS.split())
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted(words):
        symbols = "".join(alphabet[b] for b in word.encode("utf-8"))
        current = symbols[0]
        for ch in symbols[1:]:
            if (current, ch) not in seen:
                seen.add((current, ch))
                merges.append((current, ch))
            current += ch
            vocab.setdefault(current, len(vocab))
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return tokenizer


def make_tiny_qwenimage(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Build a tiny random Qwen-Image and save it with ``save_pretrained`` as a diffusers folder.

    Args:
        out_dir: folder to write (created; an existing model there is overwritten).
        seed: seed of the random weights.

    Returns:
        ``out_dir`` as a string, loadable with ``QwenImagePipeline.from_pretrained``.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    prefix = "<|im_start|>system\n" + _TEMPLATE_PREFIX_TEXT.split("\n", 1)[1].split("\nuser")[0]
    prefix += "<|im_end|>\n<|im_start|>user\n"
    if len(tokenizer(prefix).input_ids) != 34:  # the pipeline's prompt_template_encode_start_idx
        raise RuntimeError("tiny tokenizer: the chat-template prefix must be 34 tokens")

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_QWENIMAGE_DIMS["transformer"])
    vae = AutoencoderKLQwenImage(**TINY_QWENIMAGE_DIMS["vae"])
    hidden = TINY_QWENIMAGE_DIMS["text_hidden_size"]
    vocab_size = ((len(tokenizer) + 63) // 64) * 64
    text_config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden},
        hidden_size=hidden,
        vocab_size=vocab_size,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        vision_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(text_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    return str(out)


def tiny_qwenimage_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a tiny Qwen-Image in a cache folder, built on first use.

    The cache is ``$VDR_CACHE`` or ``~/.cache/verl_diffusion_rollout``; the model lands in ``tiny-qwenimage/``.
    """
    return _cached_model("tiny-qwenimage", make_tiny_qwenimage, cache_dir)


def build_tiny_clip_tokenizer(model_max_length: int | None = None):
    """A character-level ``CLIPTokenizer`` (every printable ASCII character, alone and word-final, no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        for token in (chr(code), chr(code) + "</w>"):
            vocab.setdefault(token, len(vocab))
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return CLIPTokenizer(vocab=vocab, merges=[], **kwargs)


def build_tiny_t5_tokenizer():
    """A ``T5Tokenizer`` (Unigram, as T5's SentencePiece model) over a few whole words and single characters,
    built in memory: any text tokenizes (unknown characters map to ``<unk>``) and ends with ``</s>``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in _EXTRA_WORDS.split()]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    pieces += [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def make_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Build a tiny random SD3.5 and save it with ``save_pretrained`` as a diffusers folder.

    Same classes as ``stabilityai/stable-diffusion-3.5-medium`` (``SD3Transformer2DModel`` with dual attention and
    QK-norm, ``AutoencoderKL``, ``CLIPTextModelWithProjection`` x2, ``T5EncoderModel``, CLIP and T5 tokenizers,
    ``FlowMatchEulerDiscreteScheduler`` with shift 3), dimensions in :data:`TINY_SD3_DIMS`.

    Args:
        out_dir: folder to write (created; an existing model there is overwritten).
        seed: seed of the random weights.

    Returns:
        ``out_dir`` as a string, loadable with ``StableDiffusion3Pipeline.from_pretrained``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    dims = TINY_SD3_DIMS
    clip_tokenizer = build_tiny_clip_tokenizer(model_max_length=77)
    t5_tokenizer = build_tiny_t5_tokenizer()
    clip_config = CLIPTextConfig(
        **dims["clip"], vocab_size=len(clip_tokenizer), max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    t5_config = T5Config(
        **dims["t5"], vocab_size=((len(t5_tokenizer) + 63) // 64) * 64, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**dims["transformer"])
    vae = AutoencoderKL(**dims["vae"])
    text_encoder = CLIPTextModelWithProjection(clip_config).eval()
    text_encoder_2 = CLIPTextModelWithProjection(clip_config).eval()
    text_encoder_3 = T5EncoderModel(t5_config).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_clip_tokenizer(model_max_length=77),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    return str(out)


def _cached_model(name: str, build, cache_dir: str | os.PathLike | None) -> str:
    """``<cache>/<name>``, built with ``build(path)`` on first use (atomically: a half-built folder is never used)."""
    root = Path(cache_dir or os.environ.get("VDR_CACHE") or Path.home() / ".cache" / "verl_diffusion_rollout")
    path = root / name
    if not (path / "model_index.json").is_file():
        tmp = root / f"{name}.tmp-{os.getpid()}"
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; its copy is just as good
            if not (path / "model_index.json").is_file():
                raise
    return str(path)


def tiny_sd3_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a tiny SD3.5 in a cache folder, built on first use.

    The cache is ``$VDR_CACHE`` or ``~/.cache/verl_diffusion_rollout``; the model lands in ``tiny-sd3/``.
    """
    return _cached_model("tiny-sd3", make_tiny_sd3, cache_dir)


def make_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A tiny random CLIP model and processor saved as a normal transformers folder (for reward tests).

    Same classes as PickScore's and the aesthetic predictor's CLIP backbones, loaded by the same code.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    tokenizer = build_tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    processor = CLIPProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )
    model = CLIPModel(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


# A tiny Qwen3-VL (the architecture of Qwen3-VL-8B-Instruct: Qwen3 text model with interleaved M-RoPE, a ViT with
# DeepStack taps and a 2x2 patch merger), for the ``vlm_ocr`` reward's tests.
TINY_QWEN3_VL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, rope_theta=5000000.0, max_position_embeddings=4096,
                          rms_norm_eps=1e-6, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                           "mrope_interleaved": True}, tie_word_embeddings=False)
TINY_QWEN3_VL_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                            deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")


def make_qwen3_vl(
    out_dir: str | os.PathLike,
    *,
    text: dict | None = None,
    vision: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    init=None,
    min_pixels: int = 32 * 32,
) -> str:
    """Build a random Qwen3-VL (``Qwen3VLForConditionalGeneration``) and save it as a transformers folder with a
    tokenizer (:func:`build_tiny_tokenizer` plus ``<|video_pad|>``) and a Qwen2-VL image processor (16-pixel
    patches, 2x2 merge, mean/std 0.5, at least ``min_pixels``), loadable with ``from_pretrained``.

    Args:
        text, vision: ``text_config`` / ``vision_config`` values (default: :data:`TINY_QWEN3_VL_TEXT` /
            :data:`TINY_QWEN3_VL_VISION`); the vocabulary is at least the tokenizer's.
        seed, dtype, device: the random weights, built directly on ``device`` in ``dtype``.
        init: optional ``init(model)`` applied to the built model (e.g. a transformer-style re-init).

    Returns:
        ``out_dir`` as a string.
    """
    from tokenizers import AddedToken
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    try:
        from transformers import Qwen2VLImageProcessorPil as processor_cls
    except ImportError:  # transformers 4
        from transformers import Qwen2VLImageProcessor as processor_cls

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<|video_pad|>", special=True, normalized=False)])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    text = {**TINY_QWEN3_VL_TEXT, **(text or {})}
    text["vocab_size"] = max(int(text.get("vocab_size", 0)), len(tokenizer))
    vision = {**TINY_QWEN3_VL_VISION, **(vision or {})}
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )
    image_processor = processor_cls(
        patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"], image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": min_pixels, "longest_edge": 4096 * 4096},
    )
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    if init is not None:
        init(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return str(out)
