"""Choosing the unmasked attention back-end: flash-attn 3, then 4, then 2 when installed (faked here), SDPA
otherwise, and clear errors for a back-end that cannot run."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from model import attention as backends


@pytest.fixture
def installed(monkeypatch):
    """Fake flash-attn packages: `installed("fa3", "fa4", "fa2")`; the rest are made unimportable."""
    def install(*names):
        marks = {"fa3": 3.0, "fa4": 4.0, "fa2": 2.0}
        fake = {}
        for name, mark in marks.items():
            # each returns its mark so the test sees which ran; flash-attn 4 (and some 3) also return the LSE, and
            # 4 / 2 return it (as the mark, [B, H, Lq]) only when asked with their own keyword
            def func(q, k, v, mark=mark, name=name, **asked):
                out = torch.full_like(q, mark)
                lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), mark)
                if asked.get({"fa4": "return_lse", "fa2": "return_attn_probs"}.get(name, "")):
                    return (out, lse, None) if name == "fa2" else (out, lse)
                return out if name == "fa2" else (out, lse if name == "fa3" else None)
            fake[name] = func if name in names else None
        package = types.ModuleType("flash_attn")
        if fake["fa2"]:
            package.flash_attn_func = fake["fa2"]
        cute = types.ModuleType("flash_attn.cute")
        if fake["fa4"]:
            cute.flash_attn_func = fake["fa4"]
        interface = types.ModuleType("flash_attn_interface")
        interface.flash_attn_func = fake["fa3"]
        monkeypatch.setitem(sys.modules, "flash_attn_interface", interface if fake["fa3"] else None)
        monkeypatch.setitem(sys.modules, "flash_attn", package if (fake["fa2"] or fake["fa4"]) else None)
        monkeypatch.setitem(sys.modules, "flash_attn.cute", cute if fake["fa4"] else None)
        backends._installed_flash_attn.cache_clear()
    yield install
    backends._installed_flash_attn.cache_clear()
    backends.set_attention_backend("auto")
    torch._dynamo.reset()  # compiled graphs hold the installed-or-not answer as a constant


@pytest.mark.parametrize("names, expected", [(("fa3", "fa4", "fa2"), 3.0), (("fa4", "fa2"), 4.0), (("fa2",), 2.0)])
def test_the_newest_installed_flash_attn_is_chosen_and_returns_only_the_output(installed, names, expected):
    installed(*names)
    q = torch.randn(1, 5, 2, 8)
    out = backends._flash_attn_func()(q, q, q)
    assert isinstance(out, torch.Tensor) and torch.all(out == expected)


@pytest.mark.parametrize("names, expected", [(("fa3", "fa4", "fa2"), 3.0), (("fa4", "fa2"), 4.0), (("fa2",), 2.0)])
def test_flash_attn_with_its_log_sum_exp_asks_each_version_its_own_way(installed, names, expected):
    installed(*names)
    q = torch.randn(1, 5, 2, 8)
    out, lse = backends._flash_attn_lse_func()(q, q, q)
    assert torch.all(out == expected) and lse.shape == (1, 2, 5) and torch.all(lse == expected)


def test_without_flash_attn_the_backend_cannot_be_pinned_and_auto_uses_sdpa(installed):
    installed()
    assert backends._flash_attn_func() is None
    with pytest.raises(ValueError, match="none of flash-attn 3, 4 or 2"):
        backends.set_attention_backend("flash_attn")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        backends.set_attention_backend("flash")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(3))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8 ** 0.5
    reference = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(backends.attention(q, k, v), reference, atol=1e-5, rtol=1e-5)


def test_flash_attn_is_one_opaque_op_under_torch_compile(installed, monkeypatch):
    """flash-attn 4 is a Python DSL that JIT-compiles on first call; dynamo must not trace into it. The fake here does
    a host sync and a Python branch on its value, which `fullgraph=True` would refuse to trace."""
    installed("fa4")

    def untraceable(q, k, v):
        scale = 2.0 if float(q.abs().sum()) > 0 else 3.0
        return torch.full_like(q, scale), None
    monkeypatch.setattr(sys.modules["flash_attn.cute"], "flash_attn_func", untraceable)
    backends._installed_flash_attn.cache_clear()
    compiled = torch.compile(lambda q, k, v: backends._flash_attention(q, k, v) + 1, fullgraph=True, backend="eager")
    q, kv = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8)
    out = compiled(q, kv, kv)
    assert out.shape == q.shape and torch.all(out == 3.0)


def test_compiled_attention_resolves_flash_attn_outside_the_graph(installed, monkeypatch):
    """`attention()` inside a fullgraph compile with flash-attn 4 installed (flash-attn 3's import fails, a graph break
    if dynamo traced the lookup): the opaque op without gradients; with gradients, SDPA in the graph and flash-attn's
    own autograd function eagerly."""
    installed("fa4")
    calls = []

    def fa4(q, k, v):
        calls.append(q.requires_grad)
        return torch.full_like(q, 4.0), None
    monkeypatch.setattr(sys.modules["flash_attn.cute"], "flash_attn_func", fa4)
    backends._installed_flash_attn.cache_clear()
    monkeypatch.setattr(backends, "_FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=g, dtype=torch.bfloat16) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: backends.attention(q, k, v) + 1, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.all(compiled(q, k, v) == 5.0)
    assert calls == [False]
    reference = backends._sdpa(q.float(), k.float(), v.float(), None)
    qg = q.clone().requires_grad_()
    out = compiled(qg, k, v)
    assert calls == [False]  # SDPA, not flash-attn, inside a graph that needs gradients
    torch.testing.assert_close(out.float() - 1, reference, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    assert torch.all(backends.attention(qg, k, v) == 4.0) and calls == [False, True]  # eager: flash-attn's autograd


def _math_attention_with_lse(q, k, v):
    """`[B, L, H, D]` -> output `[B, Lq, H, D]` and log-sum-exp `[B, H, Lq]`, exactly (the partials' contract)."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ v).transpose(1, 2), scores.logsumexp(-1)


def test_key_halves_merge_into_whole_attention(monkeypatch):
    """`_key_halves` (the *_halves back-ends' path: cuDNN or flash-attn on the GPU) with an exact math partial here,
    directly and through the flash-attn op: the two halves of the keys, run as a batch of two over one shared query,
    merge into whole attention; equal weights instead of the log-sum-exp ones would not."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 7, 3, 16, generator=g)
    k, v = (torch.randn(1, 10, 3, 16, generator=g) for _ in range(2))
    whole = backends._sdpa(q, k, v, None)
    halves = backends._key_halves(q, k, v, partial=_math_attention_with_lse)
    assert halves.shape == whole.shape == (1, 7, 3, 16)
    torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(backends, "_flash_attn_lse_func", lambda: _math_attention_with_lse)
    torch.testing.assert_close(backends._key_halves(q, k, v, partial=backends._flash_attention_lse), whole,
                               atol=1e-5, rtol=1e-5)
    out, _ = _math_attention_with_lse(q.expand(2, -1, -1, -1), *(t.reshape(2, 5, 3, 16) for t in (k, v)))
    assert not torch.allclose(out.mean(0, keepdim=True), whole, atol=1e-3)


def test_key_halves_backend_is_cuda_only_and_otherwise_plain_sdpa():
    """On the CPU (and for short key sets) "sdpa_cudnn_halves" is plain SDPA; unknown names are refused."""
    q, k, v = (torch.randn(1, n, 2, 8) for n in (4, 4096, 4096))
    backends.set_attention_backend("sdpa_cudnn_halves")
    try:
        torch.testing.assert_close(backends.attention(q, k, v), backends._sdpa(q, k, v, None))
    finally:
        backends.set_attention_backend("auto")
    with pytest.raises(ValueError, match="must be one of"):
        backends.set_attention_backend("sdpa_halves")


def test_flash_attn_halves_needs_flash_attn(installed):
    installed()
    with pytest.raises(ValueError, match="flash_attn_halves: none of flash-attn"):
        backends.set_attention_backend("flash_attn_halves")


@pytest.mark.parametrize("user_setting", [None, "0"])
def test_flash_attn_4_keeps_its_compiled_kernels_on_disk_unless_the_user_said_otherwise(installed, monkeypatch,
                                                                                        user_setting):
    """flash-attn 4 compiles kernels at first use; its disk cache is asked for (so a second process starts warm),
    but a user's own FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED wins."""
    if user_setting is None:
        monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    else:
        monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", user_setting)
    installed("fa4")
    assert backends._flash_attn_func() is not None
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == (user_setting or "1")


def test_the_config_accepts_exactly_the_backends_the_model_knows():
    """utils/config/schema.py writes the names out (the ground floor imports no network code): the lists must agree,
    and a name outside them is a config error that names the key."""
    from utils.config import ATTENTION_BACKEND_NAMES, ConfigError, load_config
    assert ATTENTION_BACKEND_NAMES == backends.ATTENTION_BACKENDS
    assert load_config(None, ["attention_backend=sdpa_cudnn_halves"]).inference.attention_backend == "sdpa_cudnn_halves"
    with pytest.raises(ConfigError, match="inference.attention_backend = 'sdpa_halves' is not one of"):
        load_config(None, ["attention_backend=sdpa_halves"])
