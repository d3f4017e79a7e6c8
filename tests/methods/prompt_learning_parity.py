"""PEFT comparisons shared by the virtual-token tests (prompt tuning, P-tuning, prefix tuning).

Our outputs are always checked against something that needs neither PEFT nor the KV cache: greedy
decoding that recomputes the whole sequence at every step (``greedy_without_cache``), and, for
prefix tuning on BERT, the attention equation in float64 (``check_bert_prefix_attention_float64``).
PEFT is compared on top of that wherever PEFT itself works. Where it cannot, only the PEFT
comparison is skipped, and the reason names what PEFT does:

- PEFT 0.21.2 refuses prefix tuning when the backbone's forward has no ``past_key_values``
  parameter, which is the case for BERT from transformers 5.24 on (renamed ``cache``);
- PEFT 0.21.2's ``generate`` for virtual-token methods looks for ``past_key_values`` in
  ``generate``'s keyword arguments, which transformers 5.24 names ``cache``: it re-feeds its
  virtual tokens (or prefix) at every decoding step, so its tokens differ from the cache-free
  greedy reference.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from deltatune.integrations.transformers_cache import cache_keyword

PEFT_REFUSES = "does not support past key values"  # PEFT's ValueError for a backbone without that parameter


def peft_refusal(call: Any) -> str | None:
    """Run ``call()``; return PEFT's refusal message if it refuses the model, else ``None``."""
    try:
        call()
    except ValueError as e:
        if PEFT_REFUSES not in str(e):
            raise
        return str(e)
    return None


def skip_peft_refusal(model: nn.Module, message: str) -> None:
    import peft

    pytest.skip(f"PEFT {peft.__version__} refuses prefix tuning on {type(model).__name__} ({message!r}): its "
                "forward now takes cache=, not past_key_values=; our outputs were checked against the float64 "
                "attention formula instead")


def greedy_without_cache(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int,
                         pad: int = 0) -> torch.Tensor:
    """What greedy ``generate`` must return, computed by rerunning the whole sequence each step (no cache).

    Rows stop at the model's end-of-sequence token and are padded with ``pad`` after it, as ``generate`` does.
    Positions follow ``generate``'s rule for left padding (count of real tokens before each one).
    """
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            token = logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= torch.tensor([t.item() in eos for t in token])
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def check_generate(ours: nn.Module, peft_model: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
    """Our ``generate`` equals cache-free greedy decoding, and PEFT's ``generate`` wherever PEFT's works."""
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mine = ours.generate(input_ids=ids, **kw)
        expected = greedy_without_cache(ours, ids, mask, steps)
        assert torch.equal(mine, expected), (mine, expected)
        with warnings.catch_warnings():  # PEFT warns that it ignores position_ids
            warnings.simplefilter("ignore")
            theirs = peft_model.generate(input_ids=ids, **kw)
    if torch.equal(theirs, mine):
        return
    import peft
    import transformers

    if cache_keyword(peft_model.get_base_model()) == "cache":
        pytest.skip(f"PEFT {peft.__version__}'s generate reads past_key_values from generate's arguments, which "
                    f"transformers {transformers.__version__} names cache: it re-feeds its virtual tokens every step "
                    "and differs from cache-free greedy decoding; ours was checked against that instead")
    assert torch.equal(theirs, mine), (theirs, mine)


def check_bert_prefix_attention_float64(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Every BERT self-attention layer computes, to float64 precision,

        softmax(q [P_k ; k]^T / sqrt(D) + mask) [P_v ; v]

    from its own input, with the prefix P^i read from the adapter (the paper's equation, no PEFT)."""
    attentions = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((hidden, out[0]))  # (B, T, d) in, (B, T, H·D) out

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in attentions]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(attentions) > 0
    kv = model.get_input_embeddings().adapters["default"].key_values().detach().double()  # (L, 2, H, N, D)
    mask = inputs["attention_mask"]
    keep = torch.cat([torch.ones(mask.shape[0], kv.shape[3], dtype=torch.bool), mask.bool()], dim=1)  # (B, N + T)
    for i, (module, (hidden, out)) in enumerate(zip(attentions, seen)):
        B, T, _ = hidden.shape
        H, D = kv.shape[2], kv.shape[4]
        h = hidden.double()

        def heads(linear: nn.Linear) -> torch.Tensor:
            y = h @ linear.weight.double().T + linear.bias.double()  # (B, T, H·D)
            return y.view(B, T, H, D).transpose(1, 2)                # (B, H, T, D)

        q = heads(module.query)
        k = torch.cat([kv[i, 0].expand(B, -1, -1, -1), heads(module.key)], dim=2)    # (B, H, N + T, D)
        v = torch.cat([kv[i, 1].expand(B, -1, -1, -1), heads(module.value)], dim=2)
        scores = (q @ k.transpose(-1, -2)) / D**0.5                                 # (B, H, T, N + T)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        real = mask.bool()  # padded query rows are never read downstream
        torch.testing.assert_close(out.double()[real], expected[real], rtol=0, atol=1e-5)
