"""Ulysses sequence parallelism for the SD3 / SD3.5 transformer (see :mod:`verl_diffusion_rollout.parallel.ulysses`).

:func:`use_sequence_parallel` installs, explicitly and reversibly:

* at the transformer's input, a hook that shards the text tokens (``encoder_hidden_states``) and hands the forward's
  :class:`~verl_diffusion_rollout.parallel.ulysses.SequencePlan` to the attention processors;
* on the patch embedding (``pos_embed``), a hook that keeps this rank's image tokens (the patchify and positional
  embedding act per patch, so they run on the whole latent and the result is sharded);
* on every attention module (the joint attention of each block and SD3.5's image-only ``attn2``),
  :class:`SD3SequenceParallelAttnProcessor`: diffusers' ``JointAttnProcessor2_0`` operation for operation on the
  shard, with attention over all tokens for this rank's heads;
* on the output projection (whatever module it is: a LoRA on it replaces it), a gather of the image tokens (before
  the transformer unpatchifies them), so every rank returns the full velocity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..parallel import ACTIVE_PLAN, PLAN_KWARG, HookHandle, SequenceParallel, SequencePlan, TokenShard, active_plan
from ..parallel import check_heads, ulysses_attention

__all__ = ["SD3SequenceParallelAttnProcessor", "use_sequence_parallel"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # diffusers' processor hands SDPA contiguous [B, H, L, D] tensors (made by its torch.cat); so do we.
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), dropout_p=0.0, is_causal=False)


class SD3SequenceParallelAttnProcessor:
    """SD3 attention (joint image-text, or SD3.5's image-only ``attn2``) on a rank's token shards."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sequence_plan: SequencePlan | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("SD3 attention takes no attention_mask")
        if sequence_plan is None:
            raise RuntimeError("the sequence-parallel SD3 attention needs the forward's sequence_plan")
        plan = sequence_plan
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, D], as diffusers normalises them
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        streams = [(query, key, value)]
        shards = [plan.image]
        if encoder_hidden_states is not None:
            txt = [heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                txt[0] = attn.norm_added_q(txt[0])
            if attn.norm_added_k is not None:
                txt[1] = attn.norm_added_k(txt[1])
            streams.append(tuple(txt))
            shards.append(plan.text)
        # [B, L, H, D] shards, image then text as diffusers concatenates them
        q, k, v = ([s[i].transpose(1, 2) for s in streams] for i in range(3))
        outs = [o.flatten(2, 3).to(query.dtype) for o in ulysses_attention(q, k, v, shards, _attend)]
        hidden_states = attn.to_out[0](outs[0].contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_out = outs[1]
        if not attn.context_pre_only:
            encoder_out = attn.to_add_out(encoder_out.contiguous())
        return hidden_states, encoder_out


def use_sequence_parallel(transformer: torch.nn.Module, sp: SequenceParallel) -> HookHandle:
    """Run every forward of an ``SD3Transformer2DModel`` sequence-parallel over ``sp``; returns the undo.

    Refuses (``ValueError``, before changing anything) a group size that does not divide the attention heads.
    """
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    config = transformer.config
    check_heads(sp.size, config.num_attention_heads, "ulysses_sequence_parallel_size")
    patch = config.patch_size
    handle = HookHandle.install_processor(
        transformer, (JointAttnProcessor2_0,), SD3SequenceParallelAttnProcessor(), "SD3"
    )

    def shard_inputs(module, args, kwargs):
        if args:
            raise ValueError("under sequence parallelism, call the SD3 transformer with keyword arguments")
        if kwargs.get("block_controlnet_hidden_states") is not None:
            raise ValueError("sequence parallelism does not support block_controlnet_hidden_states")
        hidden, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        plan = SequencePlan(
            text=TokenShard(text.shape[1], sp),
            image=TokenShard((hidden.shape[-2] // patch) * (hidden.shape[-1] // patch), sp),
        )
        attention_kwargs = {**(kwargs.get("joint_attention_kwargs") or {}), PLAN_KWARG: plan}
        handle.refresh_followed()  # a LoRA on proj_out replaced the module since the last forward
        ACTIVE_PLAN.set(plan)
        return args, {**kwargs, "encoder_hidden_states": plan.text.take(text), "joint_attention_kwargs": attention_kwargs}

    def clear_plan(module, args, kwargs, output):
        ACTIVE_PLAN.set(None)

    def shard_image_tokens(module, args, output: torch.Tensor) -> torch.Tensor:
        return active_plan("SD3 patch embedding").image.take(output)

    def gather_image_tokens(module, args, output: torch.Tensor) -> torch.Tensor:
        return active_plan("SD3 output projection").image.gather(output)

    handle.hooks += [
        transformer.register_forward_pre_hook(shard_inputs, with_kwargs=True),
        transformer.register_forward_hook(clear_plan, with_kwargs=True, always_call=True),
        transformer.pos_embed.register_forward_hook(shard_image_tokens),
    ]
    handle.follow("proj_out", gather_image_tokens)
    return handle
