"""Left padding to the front and back (tokensparse.padding)."""

from __future__ import annotations

import pytest
import torch

from tokensparse.padding import front_to_left, left_to_front


def left_padded(batch, heads, seq_len, dim, seq_lens):
    """Random (B, H, L, D) rows; the left padding holds NaN so any read of it shows."""
    x = torch.randn(batch, heads, seq_len, dim)
    pad = torch.arange(seq_len)[None, :] < (seq_len - seq_lens)[:, None]  # (B, L)
    return x.masked_fill(pad[:, None, :, None], float("nan")), pad


CASES = [[12, 7, 0], [12, 12, 12], [1, 11, 5]]
IDS = ["mixed_and_empty", "all_real", "short"]


@pytest.mark.parametrize("lens", CASES, ids=IDS)
def test_real_tokens_move_to_the_front_in_order(lens):
    seq_lens = torch.tensor(lens)
    x, _ = left_padded(3, 2, 12, 5, seq_lens)
    (front,) = left_to_front(x, seq_lens=seq_lens)
    assert front.shape == x.shape
    for b, n in enumerate(lens):
        assert torch.equal(front[b, :, :n], x[b, :, 12 - n :])
        if n:
            assert not front[b, :, n:].isnan().any(), "rows past the length must be copies of real rows"


@pytest.mark.parametrize("lens", CASES, ids=IDS)
def test_round_trip_restores_real_rows_and_zeroes_padding(lens):
    seq_lens = torch.tensor(lens)
    x, pad = left_padded(3, 4, 12, 3, seq_lens)
    back = front_to_left(*left_to_front(x, seq_lens=seq_lens), seq_lens, 12)
    assert back.is_contiguous()
    real = ~pad[:, None, :, None].expand_as(x)
    assert torch.equal(back[real], x[real])
    assert (back[~real] == 0).all()  # the left padding comes back as zeros, not NaN


def test_gqa_shapes_and_longer_front():
    # query (B, H, L, D) and key/value (B, Hkv, L, Dv) move together; length pads further at the end.
    seq_lens = torch.tensor([10, 3])
    q, _ = left_padded(2, 6, 10, 8, seq_lens)
    k, _ = left_padded(2, 2, 10, 8, seq_lens)
    v, _ = left_padded(2, 2, 10, 4, seq_lens)
    q_f, k_f, v_f = left_to_front(q, k, v, seq_lens=seq_lens, length=16)
    assert q_f.shape == (2, 6, 16, 8) and k_f.shape == (2, 2, 16, 8) and v_f.shape == (2, 2, 16, 4)
    assert torch.equal(k_f[1, :, :3], k[1, :, 7:]) and torch.equal(v_f[0, :, :10], v[0])
    assert torch.equal(q_f[1, :, 3:], q[1, :, 9:10].expand(-1, 13, -1))  # past the length: the last token
    back = front_to_left(v_f, seq_lens, 10)
    assert back.shape == v.shape
    assert torch.equal(back[0], v[0]) and torch.equal(back[1, :, 7:], v[1, :, 7:]) and (back[1, :, :7] == 0).all()


def test_sequence_in_dim_1():
    # (B, L, H, D), as transformers' attention functions return.
    seq_lens = torch.tensor([5, 2])
    x, pad = left_padded(2, 3, 5, 4, seq_lens)
    blhd = x.transpose(1, 2).contiguous()
    (front,) = left_to_front(blhd, seq_lens=seq_lens, dim=1)
    assert torch.equal(front.transpose(1, 2), left_to_front(x, seq_lens=seq_lens)[0])
    back = front_to_left(front, seq_lens, 5, dim=1)
    assert back.shape == blhd.shape and back.is_contiguous()
    assert torch.equal(back.transpose(1, 2), front_to_left(front.transpose(1, 2), seq_lens, 5))


def test_fully_padded_row_gives_zeros():
    seq_lens = torch.tensor([0])
    x = torch.randn(1, 2, 6, 3)
    (front,) = left_to_front(x, seq_lens=seq_lens)
    assert torch.isfinite(front).all()
    out = front.masked_fill(torch.ones_like(front, dtype=torch.bool), float("nan"))  # a kernel's junk rows
    assert (front_to_left(out, seq_lens, 6) == 0).all()
