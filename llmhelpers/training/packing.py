"""Padding-free micro-batches with exact attention: whole sequences packed into one row, each attending only to
itself.

TRL packs the pre-tokenized rows (best-fit decreasing into bins of `pack_tokens` tokens, no sequence cut) and its
padding-free collator flattens a bin into one row whose `position_ids` restart at every sequence. Without a mask,
every sequence of that row would attend to the ones packed before it: transformers' SDPA and flex_attention paths
treat a row with restarting `position_ids` and no mask as one causal sequence (measured on the GPU machine: a mean
logit difference of 0.88 against the same sequences alone). So each packed forward gets a document-causal mask
built from the `position_ids`:

- on CUDA, a flex_attention `BlockMask` (blocks outside every document are skipped, so attention costs what the
  sequences alone would), with the model's attention switched to flex_attention for that forward and backward;
- elsewhere (flex_attention has no backward on the CPU), a dense boolean [1, 1, T, T] mask for SDPA: the same rule,
  quadratic memory, fine for the tiny smoke model.

Every row is padded to the bin size, so the compiled flex kernel sees one shape (a new length would cost a
compilation); the padding positions are single-token documents with no loss.
"""
from __future__ import annotations

from contextlib import contextmanager


def document_ids(position_ids):
    """[T] index of the sequence each token belongs to: a new sequence starts wherever position_ids is 0."""
    return (position_ids.reshape(-1) == 0).cumsum(0) - 1


def trailing_padding(position_ids) -> int:
    """How many positions at the end of a packed row are padding: the collator gives each a position id of 0, and a
    real sequence is never one token long, so the padding is the final run of zeros after the last sequence."""
    return int(trailing_padding_count(position_ids))


def trailing_padding_count(position_ids):
    """trailing_padding as a 0-dim tensor on the row's device, computed without the CPU waiting for the GPU (no
    nonzero, no item): a training step adds it up and the total is read only when it is logged or saved."""
    import torch

    flat = position_ids.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    last = torch.where(flat != 0, index, -1).max()  # -1: no position is nonzero
    return torch.where(last >= 0, flat.numel() - 1 - last, 0)


def dense_document_mask(position_ids):
    """[1, 1, T, T] boolean: query i may attend key j iff same sequence and j <= i (True = attend, as SDPA reads it)."""
    import torch

    doc = document_ids(position_ids)
    n = doc.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=doc.device).tril()
    return (causal & (doc[:, None] == doc[None, :]))[None, None]


def flex_document_mask(position_ids):
    """The same rule as a flex_attention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(position_ids)
    n = doc.numel()

    def same_document_causal(b, h, q, k):
        return (doc[q] == doc[k]) & (q >= k)

    return create_block_mask(same_document_causal, None, None, n, n, device=doc.device)


def uses_flex(device) -> bool:
    return getattr(device, "type", str(device)) == "cuda"


def document_mask(position_ids):
    return flex_document_mask(position_ids) if uses_flex(position_ids.device) else dense_document_mask(position_ids)


@contextmanager
def attention_implementation(model, name: str | None):
    """Run the model with another attention implementation (config attribute read at every forward), then put the
    old one back. None: leave it as it is."""
    if name is None:
        yield
        return
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


class PackedMask:
    """Hands a packed row's document mask to the decoder stack: a forward pre-hook on the inner model fills
    `attention_mask` while `mask` is set (TRL's loss code reads `attention_mask` from the inputs as a tensor of
    ones, so the mask cannot travel there)."""

    def __init__(self, model):
        self.mask = None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = getattr(inner, "model", inner)
        self.handle = self.decoder.register_forward_pre_hook(self._fill, with_kwargs=True)

    def _fill(self, module, args, kwargs):
        if self.mask is not None and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = self.mask
        return args, kwargs

    @contextmanager
    def applied(self, model, inputs):
        """While inside: the packed row of `inputs` is attended per sequence (flex on CUDA, dense SDPA elsewhere)."""
        position_ids = inputs.get("position_ids")
        if position_ids is None or "attention_mask" in inputs:
            yield  # a padded batch: its own attention mask already says everything
            return
        self.mask = document_mask(position_ids)
        try:
            with attention_implementation(model, "flex_attention" if uses_flex(position_ids.device) else None):
                yield
        finally:
            self.mask = None
