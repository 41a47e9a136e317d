"""Ulysses sequence parallelism for the Qwen-Image transformer (see :mod:`verl_diffusion_rollout.parallel.ulysses`).

:func:`use_sequence_parallel` installs, explicitly and reversibly:

* at the transformer's input, a hook that shards the image tokens (``hidden_states``), the text tokens
  (``encoder_hidden_states``) and the text mask over the group, and hands the forward's
  :class:`~verl_diffusion_rollout.parallel.ulysses.SequencePlan` to the attention processors;
* on the RoPE module, hooks that compute the frequencies of the full text length and keep this rank's rows;
* on every joint-attention module, :class:`QwenSequenceParallelAttnProcessor`: the stages of
  :class:`~.qwenimage_attention.QwenJointAttnProcessor` on the shard, with the joint attention over all tokens for
  this rank's heads;
* at the transformer's output, a gather of the image tokens, so every rank returns the full velocity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..parallel import ACTIVE_PLAN, PLAN_KWARG, HookHandle, SequenceParallel, SequencePlan, TokenShard, active_plan
from ..parallel import check_heads, ulysses_attention
from .qwenimage_attention import QwenJointAttnProcessor, joint_mask

__all__ = ["QwenSequenceParallelAttnProcessor", "use_sequence_parallel"]


class QwenSequenceParallelAttnProcessor(QwenJointAttnProcessor):
    """Qwen-Image joint attention on a rank's token shards (Ulysses: all tokens, ``H / S`` heads per rank)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        sequence_plan: SequencePlan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(encoder_hidden_states, attention_mask)
        if sequence_plan is None:
            raise RuntimeError("the sequence-parallel Qwen-Image attention needs the forward's sequence_plan")
        plan = sequence_plan
        (txt_q, txt_k, txt_v), (img_q, img_k, img_v) = self.project(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        mask = joint_mask(plan.text_mask, plan.image.length)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

        txt, img = ulysses_attention([txt_q, img_q], [txt_k, img_k], [txt_v, img_v], [plan.text, plan.image], attend)
        return self.output(attn, txt.flatten(2, 3).to(txt_q.dtype), img.flatten(2, 3).to(txt_q.dtype))


def use_sequence_parallel(transformer: torch.nn.Module, sp: SequenceParallel) -> HookHandle:
    """Run every forward of a ``QwenImageTransformer2DModel`` sequence-parallel over ``sp``; returns the undo.

    Refuses (``ValueError``, before changing anything) a group size that does not divide the attention heads and
    the variants whose per-token inputs it does not shard (``zero_cond_t``, layer-3D RoPE).
    """
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, QwenEmbedRope

    config = transformer.config
    check_heads(sp.size, config.num_attention_heads, "ulysses_sequence_parallel_size")
    if config.get("zero_cond_t", False):
        raise ValueError("sequence parallelism does not support Qwen-Image transformers with zero_cond_t=True")
    if type(transformer.pos_embed) is not QwenEmbedRope:
        raise ValueError(f"sequence parallelism supports Qwen-Image's QwenEmbedRope, not {type(transformer.pos_embed).__name__}")
    handle = HookHandle.install_processor(
        transformer, (QwenDoubleStreamAttnProcessor2_0, QwenJointAttnProcessor), QwenSequenceParallelAttnProcessor(),
        "Qwen-Image",
    )

    def shard_inputs(module, args, kwargs):
        if args:
            raise ValueError("under sequence parallelism, call the Qwen-Image transformer with keyword arguments")
        if kwargs.get("controlnet_block_samples") is not None:
            raise ValueError("sequence parallelism does not support controlnet_block_samples")
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        mask = kwargs.get("encoder_hidden_states_mask")
        plan = SequencePlan(
            text=TokenShard(text.shape[1], sp),
            image=TokenShard(hidden.shape[1], sp),
            text_mask=None if mask is None else mask.to(torch.bool),
        )
        kwargs = {**kwargs, "hidden_states": plan.image.take(hidden), "encoder_hidden_states": plan.text.take(text)}
        if mask is not None:
            kwargs["encoder_hidden_states_mask"] = plan.text.take(mask)
        kwargs["attention_kwargs"] = {**(kwargs.get("attention_kwargs") or {}), PLAN_KWARG: plan}
        ACTIVE_PLAN.set(plan)
        return args, kwargs

    def gather_output(module, args, kwargs, output):
        ACTIVE_PLAN.set(None)
        if output is None:  # the forward raised
            return None
        plan = kwargs["attention_kwargs"][PLAN_KWARG]
        if isinstance(output, tuple):
            return (plan.image.gather(output[0]), *output[1:])
        output.sample = plan.image.gather(output.sample)
        return output

    def full_text_positions(module, args, kwargs):
        # The transformer asks for the shard's text length; RoPE positions run over the whole text.
        return args, {**kwargs, "max_txt_seq_len": active_plan("Qwen-Image RoPE").text.length}

    def shard_positions(module, args, output: Any):
        plan = active_plan("Qwen-Image RoPE")
        image_freqs, text_freqs = output
        return plan.image.take(image_freqs, dim=0), plan.text.take(text_freqs, dim=0)

    handle.hooks += [
        transformer.register_forward_pre_hook(shard_inputs, with_kwargs=True),
        transformer.register_forward_hook(gather_output, with_kwargs=True, always_call=True),
        transformer.pos_embed.register_forward_pre_hook(full_text_positions, with_kwargs=True),
        transformer.pos_embed.register_forward_hook(shard_positions),
    ]
    return handle
