"""The float64 oracle: attention over the materialised concatenation `[prefix ; sequence]`, written plainly."""

import torch


def oracle_attention(q, k, v, prefix_k, prefix_v, *, causal=True, scale=None, attention_mask=None, prefix_index=None):
    """(o, lse) in float64, computed the slow, obvious way."""
    q, k, v, pk, pv = (t.double() for t in (q, k, v, prefix_k, prefix_v))
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if prefix_index is not None:
        pk, pv = pk[prefix_index], pv[prefix_index]
    elif pk.dim() == 3:
        pk, pv = pk.expand(b, *pk.shape), pv.expand(b, *pv.shape)
    n_pre = pk.shape[2]
    keys = torch.cat([pk, k], dim=2).repeat_interleave(hq // hkv, dim=1)
    values = torch.cat([pv, v], dim=2).repeat_interleave(hq // hkv, dim=1)
    scores = q @ keys.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    visible = torch.ones(b, hq, sq, skv, dtype=torch.bool)
    if causal:
        i = torch.arange(sq)[:, None]
        j = torch.arange(skv)[None, :]
        visible &= j <= skv - sq + i
    if attention_mask is not None:
        m = attention_mask.bool()
        visible &= m[:, None, None, :] if m.dim() == 2 else m
    visible = torch.cat([torch.ones(b, hq, sq, n_pre, dtype=torch.bool), visible], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(0.0, neginf=0.0)[..., None])
    return probs @ values, lse
