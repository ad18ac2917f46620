"""Perplexity: matches a direct computation, and a non-finite window is an error naming it."""
from __future__ import annotations

import math

import pytest
import torch

from svdllm import evaluate_perplexity
from svdllm.evaluate import NonFiniteLossError


def test_matches_direct_cross_entropy(make_model, calib_tokens):
    model = make_model("llama")
    ids = calib_tokens[: 3 * 32 + 5]  # the 5 extra tokens make no partial window
    res = evaluate_perplexity(model, None, ids, seqlen=32, max_tokens=None, batch_size=2)
    assert res.windows == 3 and res.tokens == 3 * 31
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in ids[:96].view(3, 32)]
    assert res.perplexity == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


def test_non_finite_window_is_an_error(make_model, calib_tokens):
    model = make_model("llama")
    ids = calib_tokens[:128].clone()
    bad_token = next(t for t in range(len(ids)) if t not in set(ids[:64].tolist()))
    ids[2 * 32 + 10] = bad_token  # first seen in window 2
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    with pytest.raises(NonFiniteLossError, match="window 2"):
        evaluate_perplexity(model, None, ids, seqlen=32, max_tokens=None, batch_size=1)


def test_too_short_is_an_error(make_model, calib_tokens):
    with pytest.raises(ValueError, match="shorter than one window"):
        evaluate_perplexity(make_model("llama"), None, calib_tokens[:10], seqlen=32)
