"""Frame-local self-attention for the Wan transformer (video_config.use_temporal_attention false)."""

from __future__ import annotations

from typing import Any


class FrameLocalAttention:
    """Wan self-attention restricted to the tokens of the same latent frame
    (video_config.use_temporal_attention false).

    Wan orders a sample's tokens frame by frame (frame, row, column), so folding the frames into the
    batch, (B, F*HW, D) -> (B*F, HW, D), and running diffusers' own processor on that gives exactly
    a block-diagonal attention mask, without ever building the mask: the attention matrix shrinks
    from (F*HW)^2 to F*(HW)^2 entries, which is where long clips spend their memory. The rotary
    embedding is folded the same way. Cross-attention (to the caption) is left alone.

    The number of latent frames comes from the transformer's input, recorded by a forward pre-hook
    (install()), because the processor only sees flattened tokens.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.frames = 1

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, rotary_emb: Any = None) -> Any:
        frames = self.frames
        if encoder_hidden_states is not None or frames == 1:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        batch, tokens, dim = hidden_states.shape
        per_frame = tokens // frames
        folded = hidden_states.reshape(batch * frames, per_frame, dim)
        if rotary_emb is not None:
            rotary_emb = tuple(r.reshape(frames, per_frame, *r.shape[2:]).repeat(batch, 1, 1, 1) for r in rotary_emb)
        out = self.inner(attn, folded, None, attention_mask, rotary_emb)
        return out.reshape(batch, tokens, out.shape[-1])

    @staticmethod
    def install(transformer: Any) -> None:
        """Give every block's self-attention a FrameLocalAttention sharing one frame count."""
        processors = [FrameLocalAttention(block.attn1.processor) for block in transformer.blocks]
        for block, processor in zip(transformer.blocks, processors):
            block.attn1.set_processor(processor)
        patch_frames = int(transformer.config.patch_size[0])

        def record_frames(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            for processor in processors:
                processor.frames = hidden.shape[2] // patch_frames

        transformer.register_forward_pre_hook(record_frames, with_kwargs=True)
