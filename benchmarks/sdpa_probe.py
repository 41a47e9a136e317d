"""Which SDPA backend runs Qwen-Image's joint attention fastest, with and without a key-padding mask.

    python benchmarks/sdpa_probe.py

Batched CFG puts a prompt and the (shorter) negative prompt in one batch, so the joint attention needs a
key-padding mask; a mask rules out FlashAttention in PyTorch's SDPA. This times every backend that accepts each
case at the shapes of a 512px and a 1024px batch-16 CFG forward (bf16, 24 heads x 128).
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def bench(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for image_tokens in (1024, 4096):
        batch, heads, dim, text = 32, 24, 128, 64
        seq = text + image_tokens
        q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(batch, 1, 1, seq, dtype=torch.bool, device="cuda")
        mask[batch // 2 :, :, :, 8:text] = False  # the negative half: 8 real text tokens, the rest padding
        flops = 4 * batch * heads * seq * seq * dim
        for name, backend in BACKENDS.items():
            for masked in (False, True):
                try:
                    with sdpa_kernel([backend]):
                        ms = bench(lambda: sdpa(q, k, v, attn_mask=mask if masked else None))
                    print(f"{image_tokens:5d} img tokens  {name:9s} mask={masked!s:5s}  {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
                except RuntimeError as err:
                    print(f"{image_tokens:5d} img tokens  {name:9s} mask={masked!s:5s}  unsupported ({str(err).splitlines()[0][:60]})")


if __name__ == "__main__":
    main()
