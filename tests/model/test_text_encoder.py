"""Tests for model/text_encoder.py: key conversion, config derivation, tokenization/masking, loaders."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

from model.text_encoder import (
    TextEncoder,
    build_word_tokenizer,
    clean_prompt,
    convert_wan_t5_state_dict,
    umt5_config_from_wan_t5,
    umt5_xxl_config,
    zero_padded_rows,
)

WORDS = ["a", "red", "blue", "circle", "square", "moves", "left", "on", "background", "<", ">", "&"]


def random_wan_t5(vocab=40, dim=24, dim_attn=32, dim_ffn=20, heads=4, layers=2, buckets=8, seed=0):
    """Random weights with the original Wan T5 encoder key names (attention width != model width)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "token_embedding.weight": torch.randn(vocab, dim, generator=g),
        "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[p + "norm2.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        for n in "qkv":
            sd[p + f"attn.{n}.weight"] = torch.randn(dim_attn, dim, generator=g) / dim**0.5
        sd[p + "attn.o.weight"] = torch.randn(dim, dim_attn, generator=g) / dim_attn**0.5
        sd[p + "ffn.gate.0.weight"] = torch.randn(dim_ffn, dim, generator=g) / dim**0.5
        sd[p + "ffn.fc1.weight"] = torch.randn(dim_ffn, dim, generator=g) / dim**0.5
        sd[p + "ffn.fc2.weight"] = torch.randn(dim, dim_ffn, generator=g) / dim_ffn**0.5
        sd[p + "pos_embedding.embedding.weight"] = torch.randn(buckets, heads, generator=g)
    return sd


def build_umt5(wan_sd) -> UMT5EncoderModel:
    model = UMT5EncoderModel(umt5_config_from_wan_t5(wan_sd))
    model.load_state_dict(convert_wan_t5_state_dict(wan_sd), strict=True)
    return model.eval()


@pytest.fixture
def text_encoder() -> TextEncoder:
    tokenizer = build_word_tokenizer(WORDS)
    return TextEncoder(tokenizer, build_umt5(random_wan_t5(vocab=len(tokenizer))), text_len=12)


# ----------------------------------------------------------------------------------------------- golden


@pytest.mark.golden
def test_golden_t5_encoder_matches_reference(golden):
    case = golden("t5_encoder")
    wan_sd = case.weights()
    assert set(wan_sd) == set(case.meta["weights_keys"])

    config = umt5_config_from_wan_t5(wan_sd)
    for key, value in case.meta["equivalent_transformers_UMT5Config"].items():
        assert getattr(config, key) == value, key
    model = UMT5EncoderModel(config)
    model.load_state_dict(convert_wan_t5_state_dict(wan_sd), strict=True)
    model.eval()

    ids, mask = case.io["input_ids"], case.io["attention_mask"]
    length = ids.shape[1]
    attn = model.encoder.block[0].layer[0].SelfAttention
    bias = attn.compute_bias(length, length)[0]
    torch.testing.assert_close(bias, case.io["layer0.position_bias"], atol=1e-6, rtol=0)

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = case.io["encoder_output"]
    assert out.shape == ref.shape
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=0)

    enc = TextEncoder(build_word_tokenizer([]), model, text_len=length)
    embeds = enc.encode_ids(ids, mask)
    torch.testing.assert_close(embeds, case.io["prompt_embeds"], atol=1e-5, rtol=0)
    for b, n in enumerate(case.meta["valid_lengths"]):
        assert torch.all(embeds[b, n:] == 0)
        assert torch.all(case.io["prompt_embeds"][b, n:] == 0)


@pytest.mark.golden
def test_manifest_umt5_xxl_converts_to_exact_model_keys(golden):
    manifest = golden("t5_encoder").json("manifest_umt5_xxl_encoder.json")
    wan_sd = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    assert len(wan_sd) == manifest["num_tensors"]

    config = umt5_config_from_wan_t5(wan_sd)
    xxl = umt5_xxl_config()
    sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets")
    for key in sizes:
        assert getattr(config, key) == getattr(xxl, key), key
    assert config.num_heads * config.d_kv == manifest["config"]["dim_attn"]

    with torch.device("meta"):
        model = UMT5EncoderModel(xxl)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_wan_t5_state_dict(wan_sd).items()}
    assert converted == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


# ----------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("bad_key", ["blocks.0.attn.qkv.weight", "pos_embedding.embedding.weight", "head.weight"])
def test_convert_unknown_key_is_named(bad_key):
    sd = random_wan_t5(layers=1)
    sd[bad_key] = torch.zeros(1)
    with pytest.raises(KeyError, match=bad_key.replace(".", r"\.")):
        convert_wan_t5_state_dict(sd)


def test_config_from_shapes_with_attention_width_differing_from_model_width():
    wan_sd = random_wan_t5(vocab=40, dim=24, dim_attn=36, dim_ffn=20, heads=3, layers=3, buckets=8)
    config = umt5_config_from_wan_t5(wan_sd)
    assert (config.vocab_size, config.d_model, config.d_kv, config.num_heads) == (40, 24, 12, 3)
    assert (config.d_ff, config.num_layers, config.relative_attention_num_buckets) == (20, 3, 8)
    assert config.dense_act_fn == "gelu_new" and config.is_gated_act
    with pytest.raises(KeyError, match="token_embedding"):
        umt5_config_from_wan_t5({k: v for k, v in random_wan_t5().items() if k != "token_embedding.weight"})


# ----------------------------------------------------------------------------------------------- tokenization


def test_build_word_tokenizer_ids():
    tok = build_word_tokenizer(["red", "circle", "red"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("Red circle zebra")["input_ids"] == [3, 4, 2, 1]


def test_clean_prompt():
    assert clean_prompt("  a  red\n\tcircle  ") == "a red circle"
    assert clean_prompt("a &amp;lt;red&amp;gt; &amp;amp; blue") == "a <red> & blue"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # mojibake repaired by ftfy


def test_encode_pads_appends_eos_and_zeroes_rows(text_encoder):
    tok = text_encoder.tokenizer
    ids, mask = text_encoder.tokenize(["a red circle", "blue"])
    assert ids.shape == mask.shape == (2, text_encoder.text_len)
    assert mask.sum(1).tolist() == [4, 2]
    assert ids[0, :4].tolist() == tok.convert_tokens_to_ids(["a", "red", "circle", "</s>"])
    assert torch.all(ids[0, 4:] == tok.pad_token_id) and ids[1, 1] == tok.eos_token_id

    out = text_encoder.encode(["a red circle", "blue"])
    assert out.shape == (2, text_encoder.text_len, text_encoder.dim)
    assert not out.requires_grad
    for b, n in enumerate([4, 2]):
        assert torch.all(out[b, n:] == 0)
        assert torch.all(out[b, :n].abs().sum(-1) > 0)


def test_encode_cleans_text_deterministic_and_batch_independent(text_encoder):
    ref = text_encoder.encode(["a <red> & blue circle"])
    messy = text_encoder.encode(["  a &amp;lt;red&amp;gt;   &amp;amp;\n blue circle "])
    assert torch.equal(ref, messy)
    assert torch.equal(ref, text_encoder.encode(["a <red> & blue circle"]))
    batched = text_encoder.encode(["a <red> & blue circle", "square moves left on a blue background"])
    torch.testing.assert_close(batched[:1], ref, atol=1e-6, rtol=0)


def test_long_prompt_truncated_with_one_warning(text_encoder):
    long_prompt = " ".join(["red circle"] * text_encoder.text_len)
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = text_encoder.tokenize([long_prompt, "a"])
    assert mask[0].all() and ids[0, -1] == text_encoder.tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = text_encoder.encode([long_prompt])
    assert out.shape[1] == text_encoder.text_len and torch.all(out[0].abs().sum(-1) > 0)


def test_frozen_eval_output_dtype_and_offload(text_encoder):
    holder = torch.nn.ModuleDict({"text": text_encoder})
    holder.train()
    assert not text_encoder.encoder.training
    assert not any(p.requires_grad for p in text_encoder.parameters())
    out = text_encoder.encode(["a red"], output_device="cpu", dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.device.type == "cpu"
    assert text_encoder.offload().device.type == "cpu"


def test_zero_padded_rows_uses_token_count():
    embeds = torch.ones(2, 5, 3)
    out = zero_padded_rows(embeds, torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]))
    assert out.sum(-1).tolist() == [[3, 3, 3, 0, 0], [3, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_from_wan_checkpoint(tmp_path, suffix, text_encoder):
    tokenizer = text_encoder.tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    wan_sd = random_wan_t5(vocab=len(tokenizer), heads=2, dim_attn=16, seed=3)
    path = tmp_path / f"t5{suffix}"
    if suffix == ".pth":
        torch.save({k: v.to(torch.bfloat16) for k, v in wan_sd.items()}, path)
    else:
        save_file({k: v.to(torch.bfloat16) for k, v in wan_sd.items()}, str(path))

    loaded = TextEncoder.from_wan_checkpoint(path, tmp_path / "tok", text_len=10)
    assert loaded.encoder.shared.weight.dtype == torch.float32
    assert loaded.encoder.shared is loaded.encoder.encoder.embed_tokens
    reference = build_umt5({k: v.to(torch.bfloat16).float() for k, v in wan_sd.items()})
    ids, mask = loaded.tokenize(["a red circle moves left"])
    expected = TextEncoder(tokenizer, reference, text_len=10).encode_ids(ids, mask)
    torch.testing.assert_close(loaded.encode(["a red circle moves left"]), expected)


def test_from_diffusers_folder(tmp_path, text_encoder):
    text_encoder.encoder.save_pretrained(tmp_path / "text_encoder")
    text_encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = TextEncoder.from_diffusers_folder(tmp_path, text_len=text_encoder.text_len)
    prompts = ["a red circle", "blue square on a background"]
    torch.testing.assert_close(loaded.encode(prompts), text_encoder.encode(prompts), atol=0, rtol=0)


def test_missing_files_and_bad_checkpoint(tmp_path, text_encoder):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TextEncoder.from_wan_checkpoint(tmp_path / "nope.pth", tmp_path)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        TextEncoder.from_diffusers_folder(tmp_path)
    text_encoder.tokenizer.save_pretrained(tmp_path / "tok")
    sd = random_wan_t5(layers=1)
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError, match=r"blocks\.0\.extra\.weight"):
        TextEncoder.from_wan_checkpoint(tmp_path / "bad.safetensors", tmp_path / "tok")
