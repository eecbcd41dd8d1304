"""Left padding to padding at the end, and back.

transformers pads a batch on the left: sequence b's ``seq_lens[b]`` real tokens
sit at positions ``pad_b = L - seq_lens[b]`` to ``L - 1``. Kernels that take
per-sequence lengths (block-sparse attention, FlexPrefill's estimate, the
banded sink + local attention) want them at the front instead, with the padding
at the end where a length mask handles it. :func:`left_to_front` moves the real
tokens to the front; :func:`front_to_left` puts rows back where they came from.

Only torch is imported here, so any module may use it.
"""

from __future__ import annotations

import torch


def left_to_front(
    *tensors: torch.Tensor, seq_lens: torch.Tensor, length: int | None = None, dim: int = 2
) -> tuple[torch.Tensor, ...]:
    """Move each sequence's real tokens from the end (left padding) to the front.

    Args:
        tensors: (B, ..., L, ...) with the sequence at ``dim``, e.g. query
            (B, H, L, D) and key/value (B, Hkv, L, D); the other dimensions may
            differ between tensors.
        seq_lens: (B,) int real tokens per sequence, in [0, L].
        length: T, the length of the result (default L); T > L pads further at
            the end (e.g. to whole blocks).
        dim: the sequence dimension (2 for (B, H, L, D), 1 for (B, L, H, D)).

    Returns:
        One tensor per input, with the sequence dimension T: row t of sequence b
        is input row ``pad_b + t`` for t < seq_lens[b]; later rows repeat input
        row L - 1 (the last real token, or padding for a fully padded row), so
        they are finite but must be masked by ``seq_lens``.
    """
    seq_len = tensors[0].shape[dim]
    src = _real_positions(seq_lens, seq_len, seq_len if length is None else length).clamp(max=seq_len - 1)
    return tuple(t.gather(dim, _along(src, t, dim)) for t in tensors)


def front_to_left(tensor: torch.Tensor, seq_lens: torch.Tensor, seq_len: int, *, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`left_to_front`: put the front rows back behind the left padding.

    Args:
        tensor: (B, ..., T, ...) with the sequence at ``dim``; row t of sequence
            b (t < seq_lens[b]) belongs at position ``L - seq_lens[b] + t``.
        seq_lens: (B,) int real tokens per sequence, in [0, L], at most T.
        seq_len: L.
        dim: the sequence dimension.

    Returns:
        (B, ..., L, ...) contiguous, in ``tensor``'s dtype: rows of the left
        padding are zero; rows at or past ``seq_lens[b]`` of the input are dropped.
    """
    # Output position p of sequence b reads front row p - pad_b; the left padding (p < pad_b) reads row 0 and is zeroed.
    pad = seq_len - seq_lens.to(torch.long)
    src = torch.arange(seq_len, device=seq_lens.device)[None, :] - pad[:, None]  # (B, L)
    out = tensor.gather(dim, _along(src.clamp(min=0), tensor, dim))
    return out.masked_fill(_along(src < 0, out, dim), 0)


def _real_positions(seq_lens: torch.Tensor, seq_len: int, length: int) -> torch.Tensor:
    """(B, length) int64: position in the left-padded sequence of front row t (may pass L - 1)."""
    pad = seq_len - seq_lens.to(torch.long)
    return torch.arange(length, device=seq_lens.device)[None, :] + pad[:, None]


def _along(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T) index or mask expanded to ``like``'s shape with T at ``dim``, for gather and masked_fill."""
    view = [1] * like.dim()
    view[0], view[dim] = index.shape
    size = list(like.shape)
    size[dim] = index.shape[1]
    return index.to(like.device).view(view).expand(size)
