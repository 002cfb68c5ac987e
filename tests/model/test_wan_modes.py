"""Consistency between the DiT's attention modes, the KV cache policies, gradients and input errors."""
from __future__ import annotations

import pytest
import torch

from model.attention import BlockCausal
from tests.tiny import tiny_inputs, tiny_model


def per_block_timesteps(batch: int, frames: int, block: int) -> torch.Tensor:
    values = torch.tensor([900.0, 500.0, 0.0, 250.0, 750.0, 10.0])
    return values[(torch.arange(frames) // block) % len(values)].expand(batch, frames).clone()


def kv_chunks(model, x, t, context, block, window=-1, sink=0, rope="absolute", capacity=None):
    b, f, _, h, w = x.shape
    cache = model.new_kv_cache(b, h, w, capacity or (window if window != -1 else f), window_frames=window,
                               sink_frames=sink, rope=rope)
    outs = [model.forward_cached(x[:, s:s + block], t[:, s:s + block], context, cache, s)
            for s in range(0, f, block)]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("window", [-1, 4])
def test_kv_cache_path_equals_block_causal_path(window):
    model = tiny_model()
    x, context = tiny_inputs(model, frames=8)
    t = per_block_timesteps(2, 8, 2)
    with torch.no_grad():
        full = model(x, t, context, block_causal=BlockCausal(2, local_attn_size=window))
        chunked, cache = kv_chunks(model, x, t, context, block=2, window=window)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert cache.num_frames_held == (8 if window == -1 else window)


def test_bidirectional_equals_single_block_causal_and_uniform_timesteps():
    model = tiny_model()
    x, context = tiny_inputs(model, frames=4)
    t = torch.tensor([700.0, 30.0])
    with torch.no_grad():
        bidi = model(x, t, context)
        per_frame = model(x, t[:, None].expand(-1, 4), context)
        one_block = model(x, t[:, None].expand(-1, 4), context, block_causal=BlockCausal(4))
    torch.testing.assert_close(per_frame, bidi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_block, bidi, atol=1e-5, rtol=1e-5)


def test_relative_rope_equals_absolute_until_the_cache_rolls_then_runs_past_the_table():
    model = tiny_model(rope_max_positions=8)
    x, context = tiny_inputs(model, batch=1, frames=16)
    t = per_block_timesteps(1, 16, 2)
    with torch.no_grad():
        absolute, _ = kv_chunks(model, x[:, :6], t[:, :6], context[:1], block=2, window=6, sink=2)
        relative, _ = kv_chunks(model, x[:, :6], t[:, :6], context[:1], block=2, window=6, sink=2, rope="relative")
        torch.testing.assert_close(relative, absolute, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="RoPE"):  # absolute positions run out of the 8-entry table
            kv_chunks(model, x, t, context[:1], block=2, window=6, sink=2)
        long, cache = kv_chunks(model, x, t, context[:1], block=2, window=6, sink=2, rope="relative")
    assert torch.isfinite(long).all() and cache.num_frames_held == 6


def test_rolling_cache_keeps_sink_frames_pinned():
    model = tiny_model()
    x, context = tiny_inputs(model, batch=1, frames=10)
    t = per_block_timesteps(1, 10, 2)
    with torch.no_grad():
        _, cache = kv_chunks(model, x[:, :2], t[:, :2], context[:1], block=2, window=6, sink=2)
        sink_keys = cache.k[:, :, :cache.tokens_per_frame * 2].clone()
        for s in range(2, 10, 2):
            model.forward_cached(x[:, s:s + 2], t[:, s:s + 2], context[:1], cache, s)
    assert torch.equal(cache.k[:, :, :cache.tokens_per_frame * 2], sink_keys)
    assert cache.global_end == 10 * cache.tokens_per_frame and cache.local_end == cache.capacity


def test_cache_overflow_and_out_of_order_calls_are_errors():
    model = tiny_model()
    x, context = tiny_inputs(model, batch=1, frames=6)
    t = per_block_timesteps(1, 6, 2)
    cache = model.new_kv_cache(1, 4, 6, capacity_frames=4)
    with torch.no_grad():
        model.forward_cached(x[:, :2], t[:, :2], context, cache, 0)
        with pytest.raises(ValueError, match="only append or rewrite"):
            model.forward_cached(x[:, :2], t[:, :2], context, cache, 4)
        model.forward_cached(x[:, 2:4], t[:, 2:4], context, cache, 2)
        with pytest.raises(ValueError, match="overflow"):
            model.forward_cached(x[:, 4:6], t[:, 4:6], context, cache, 4)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(1, 2, 3, 4, 6)), r"\[B, F, 4, H, W\]"),
    (dict(x=torch.zeros(1, 2, 4, 5, 6)), "divisible by the patch size"),
    (dict(t=torch.zeros(1, 3)), "timesteps"),
    (dict(context=torch.zeros(1, 9, 16)), "more than text_len"),
    (dict(context=torch.zeros(1, 4, 15)), "text context"),
])
def test_bad_inputs_are_named(bad, match):
    model = tiny_model()
    args = dict(x=torch.zeros(1, 2, 4, 4, 6), t=torch.zeros(1, 2), context=torch.zeros(1, 4, 16))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        model(args["x"], args["t"], args["context"])


def test_each_mode_returns_its_one_type_and_names_its_own_input_errors():
    model = tiny_model()
    x, context = tiny_inputs(model, batch=1, frames=4)
    t = per_block_timesteps(1, 4, 2)
    mask = BlockCausal(2)
    cache = model.new_kv_cache(1, 4, 6, capacity_frames=4)
    with torch.no_grad():
        assert model.write_cache(x[:, :2], t[:, :2], context, cache, 0) is None
        assert cache.global_end == 2 * cache.tokens_per_frame  # the call's only effect: the cache holds its K/V
        cached = model.forward_cached(x[:, 2:], t[:, 2:], context, cache, 2)
        flow, hidden, e = model.features(x, t[:, 0], context, (0, 1))
        forced = model.forward_teacher_forcing(x, t, context, x, mask)
        with pytest.raises(ValueError, match="clean_x must have the latents' shape"):
            model.forward_teacher_forcing(x, t, context, x[:, :2], mask)
        with pytest.raises(ValueError, match=r"aug_t must be \[B, F\]"):
            model.forward_teacher_forcing(x, t, context, x, mask, aug_t=t[:, :2])
        with pytest.raises(ValueError, match=r"layers \[2\] name blocks outside 0..1"):
            model.features(x, t[:, 0], context, (2,))
    assert cached.shape == x[:, 2:].shape and forced.shape == flow.shape == x.shape
    torch.testing.assert_close(flow, model(x, t[:, 0], context))  # features: the bidirectional call, plus taps
    assert [h.shape for h in hidden] == [(1, 4 * 2 * 3, 32)] * 2 and e.shape == (1, 1, 32)


def test_frames_not_divisible_by_block_is_an_error():
    model = tiny_model()
    x, context = tiny_inputs(model, frames=5)
    with pytest.raises(ValueError, match="blocks of 2"):
        model(x, torch.zeros(2, 5), context, block_causal=BlockCausal(2))


def test_kv_cached_forward_with_grad_reaches_text_and_cross_attention():
    model = tiny_model()
    x, context = tiny_inputs(model, batch=1, frames=4)
    t = per_block_timesteps(1, 4, 2)
    cache = model.new_kv_cache(1, 4, 6, capacity_frames=4)
    with torch.no_grad():
        model.forward_cached(x[:, :2], t[:, :2], context, cache, 0)
    out = model.forward_cached(x[:, 2:], t[:, 2:], context, cache, 2)
    out.square().mean().backward()
    block = model.blocks[0]
    for param in (block.self_attn.k.weight, block.self_attn.q.weight, block.cross_attn.k.weight,
                  model.text_embedding[0].weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert not cache.k.requires_grad  # the paper's semantics: the cache carries no graph


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.set_gradient_checkpointing(checkpointing)
        x, context = tiny_inputs(model, frames=4)
        model(x, per_block_timesteps(2, 4, 2), context, block_causal=BlockCausal(2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


class AttentionCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts SDPA kernel calls by (queries, keys) while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.calls.append((args[0].shape[-2], args[1].shape[-2]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cached", [False, True], ids=["whole_clip", "kv_cached_chunk"])
def test_checkpointing_that_keeps_self_attention_gives_the_same_gradients_without_recomputing_it(cached):
    """Selective recomputation keeps the self-attention outputs: backward reruns no self-attention kernel (the plain
    checkpoint reruns one per layer), cross-attention is recomputed, and the gradients are those of no checkpointing."""
    grads, recomputed = {}, {}
    for mode in ("none", "full", "keep"):
        model = tiny_model()
        model.set_gradient_checkpointing(mode != "none", keep_self_attention=mode == "keep")
        x, context = tiny_inputs(model, frames=4)
        t = per_block_timesteps(2, 4, 2)
        if cached:
            cache = model.new_kv_cache(2, *x.shape[3:], capacity_frames=4)
            with torch.no_grad():
                model.forward_cached(x[:, :2], t[:, :2], context, cache, 0)
            loss = model.forward_cached(x[:, 2:], t[:, 2:], context, cache, 2).square().mean()
        else:
            loss = model(x, t[:, 0], context).square().mean()
        with AttentionCalls() as counter:
            loss.backward()
        recomputed[mode] = [keys >= queries for queries, keys in counter.calls]  # True: self-attention
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    layers = len(model.blocks)
    assert recomputed["none"] == [] and recomputed["full"].count(True) == layers  # self-attention, once per layer
    assert recomputed["keep"] == [False] * layers  # cross-attention only
    torch.testing.assert_close(grads["keep"], grads["none"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads["full"], grads["none"], atol=1e-6, rtol=1e-5)


def test_bfloat16_runs_on_cpu():
    model = tiny_model().to(torch.bfloat16)
    x, context = tiny_inputs(model, frames=4)
    with torch.no_grad():
        out = model(x.bfloat16(), per_block_timesteps(2, 4, 2), context.bfloat16(), block_causal=BlockCausal(2))
        ref = tiny_model()(x, per_block_timesteps(2, 4, 2), context, block_causal=BlockCausal(2))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_x0_prediction_returns_the_flow_of_its_clean_estimate():
    """prediction="x0": the head's output is the clean latent; forward() returns (x_t - x0) / sigma (sigma = t/1000,
    floored), per sample or per frame, in every attention mode, so samplers and losses need not know."""
    from model.config import X0_PREDICTION_MIN_SIGMA
    flow_model = tiny_model()
    x0_model = tiny_model(prediction="x0")
    x0_model.load_state_dict(flow_model.state_dict())
    x, context = tiny_inputs(flow_model, frames=6)
    per_sample = torch.tensor([1000.0, 20.0])                  # 20 -> sigma 0.02, below the floor
    per_frame = per_block_timesteps(2, 6, 2)
    with torch.no_grad():
        for t in (per_sample, per_frame):
            head = flow_model(x, t, context)                    # same weights: the x0 model's head output
            sigma = (t / 1000).clamp(min=X0_PREDICTION_MIN_SIGMA)
            sigma = (sigma[:, None] if t.dim() == 1 else sigma)[..., None, None, None]
            torch.testing.assert_close(x0_model(x, t, context), (x - head) / sigma)
        full = x0_model(x, per_frame, context, block_causal=BlockCausal(2))
        chunked, _ = kv_chunks(x0_model, x, per_frame, context, block=2)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction must be one of"):
        tiny_model(prediction="eps")
