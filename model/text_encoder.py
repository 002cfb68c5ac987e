"""Text encoder: the UMT5 encoder of Wan2.1 as a `transformers.UMT5EncoderModel`, plus its tokenizer.

Reproduces `utils/wan_wrapper.py::WanTextEncoder` of the original: text cleaning, padding to
`text_len` tokens with EOS appended, the encoder under the attention mask, then every row past the number of
real tokens set to zero. Weights load from a diffusers folder or from the original Wan checkpoint
(`models_t5_umt5-xxl-enc-bf16.pth`), whose keys are renamed by the one table `_WAN_T5_TO_UMT5`.
"""
from __future__ import annotations

import html
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import ftfy
import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

# Original Wan T5 encoder key -> UMT5EncoderModel key(s); `{i}` is the block index. The token embedding is
# tied to `encoder.embed_tokens` in transformers, so it fills both names.
_WAN_T5_TO_UMT5: dict[str, tuple[str, ...]] = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
    "blocks.{i}.norm1.weight": ("encoder.block.{i}.layer.0.layer_norm.weight",),
    "blocks.{i}.attn.q.weight": ("encoder.block.{i}.layer.0.SelfAttention.q.weight",),
    "blocks.{i}.attn.k.weight": ("encoder.block.{i}.layer.0.SelfAttention.k.weight",),
    "blocks.{i}.attn.v.weight": ("encoder.block.{i}.layer.0.SelfAttention.v.weight",),
    "blocks.{i}.attn.o.weight": ("encoder.block.{i}.layer.0.SelfAttention.o.weight",),
    "blocks.{i}.pos_embedding.embedding.weight": (
        "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    "blocks.{i}.norm2.weight": ("encoder.block.{i}.layer.1.layer_norm.weight",),
    # The original computes fc2(fc1(x) * gelu(gate(x))); transformers applies the activation to wi_0.
    "blocks.{i}.ffn.gate.0.weight": ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",),
    "blocks.{i}.ffn.fc1.weight": ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",),
    "blocks.{i}.ffn.fc2.weight": ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight",),
}
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def convert_wan_t5_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original Wan T5 encoder state dict onto `UMT5EncoderModel` keys (tensors are not copied).

    Raises KeyError naming every key the table does not know (e.g. a `shared_pos=True` T5's top-level
    `pos_embedding.embedding.weight`, which UMT5 cannot represent).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        match = _BLOCK_INDEX.match(key)
        template = _BLOCK_INDEX.sub("blocks.{i}.", key) if match else key
        targets = _WAN_T5_TO_UMT5.get(template)
        if targets is None:
            unknown.append(key)
            continue
        for target in targets:
            out[target.format(i=match.group(1)) if match else target] = tensor
    if unknown:
        raise KeyError(
            f"unknown Wan T5 encoder key(s) {sorted(unknown)}; expected only keys of the form "
            f"{sorted(_WAN_T5_TO_UMT5)} (a per-block relative position embedding, i.e. umt5 with shared_pos=False)"
        )
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyError(f"Wan T5 encoder state dict lacks {key!r}, needed to derive the UMT5 configuration")
    return tuple(sd[key].shape)


def umt5_config_from_wan_t5(sd: Mapping[str, torch.Tensor]) -> UMT5Config:
    """Derive the `UMT5Config` of an original Wan T5 encoder from its tensor shapes (meta tensors work too)."""
    vocab, d_model = _shape(sd, "token_embedding.weight")
    num_buckets, num_heads = _shape(sd, "blocks.0.pos_embedding.embedding.weight")
    attn_width = _shape(sd, "blocks.0.attn.q.weight")[0]
    d_ff = _shape(sd, "blocks.0.ffn.fc1.weight")[0]
    blocks = {int(m.group(1)) for m in map(_BLOCK_INDEX.match, sd) if m}
    if blocks != set(range(len(blocks))):
        raise KeyError(f"Wan T5 encoder block indices must be 0..N-1, got {sorted(blocks)}")
    if attn_width % num_heads:
        raise ValueError(
            f"attention width {attn_width} (blocks.0.attn.q.weight) is not divisible by the {num_heads} heads "
            "given by blocks.0.pos_embedding.embedding.weight"
        )
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        # The original's attention width (dim_attn) may differ from d_model; transformers uses heads * d_kv.
        d_kv=attn_width // num_heads,
        d_ff=d_ff,
        num_layers=len(blocks),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )


def umt5_xxl_config() -> UMT5Config:
    """The UMT5-XXL encoder of Wan2.1 (`umt5_xxl(encoder_only=True)`), a fresh object per call."""
    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    )


def load_wan_t5_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original-key T5 checkpoint: a `.pth` (weights_only) or a `.safetensors` file, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Wan T5 encoder checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # mmap keeps the 11 GB bf16 file out of RAM until each tensor is cast and copied.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} holds a {type(sd).__name__}, expected a state dict of tensors")
    return dict(sd)


def _load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype) -> None:
    """Strictly load `sd` into a meta-device `model`, casting once per distinct tensor (tied ones stay shared)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{source}: missing UMT5 keys {missing}, unexpected keys {unexpected}")
    for key, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    cast: dict[int, torch.Tensor] = {}
    for tensor in sd.values():
        cast.setdefault(id(tensor), tensor.to(dtype))
    model.load_state_dict({k: cast[id(t)] for k, t in sd.items()}, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # assign=True gives each name its own Parameter; re-tie them


def clean_prompt(text: str) -> str:
    """The original's "whitespace" cleaning: ftfy, HTML-unescape twice, strip, collapse whitespace runs."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def zero_padded_rows(embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Zero every row at a position >= the number of real tokens, as the original wrapper does.

    embeds `[B, L, C]`, attention_mask `[B, L]` (1 = real token, right padding) -> `[B, L, C]` (a new tensor).
    """
    lengths = attention_mask.gt(0).sum(dim=1)
    keep = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths.to(embeds.device)[:, None]
    return embeds * keep[..., None].to(embeds.dtype)


def build_word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: `<pad>`=0, `</s>`=1 (appended to every text), `<unk>`=2, then `words`.

    Text is lower-cased and split on whitespace and punctuation, so `words` should be lower case.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )


class TextEncoder(nn.Module):
    """Frozen UMT5 encoder + tokenizer: prompts -> `[B, text_len, d_model]` embeddings (padded rows zero)."""

    def __init__(
        self,
        tokenizer,
        encoder: UMT5EncoderModel,
        text_len: int = 512,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.text_len = text_len
        self._warned_truncation = False
        if device is not None:
            self.encoder.to(device)

    @property
    def device(self) -> torch.device:
        return self.encoder.shared.weight.device

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def train(self, mode: bool = True) -> TextEncoder:
        # A parent's .train() must not switch on the encoder's dropout (0.1); the original keeps it in eval.
        return super().train(False)

    def offload(self) -> TextEncoder:
        """Move the weights to CPU (e.g. after the prompts of a run are encoded) to free accelerator memory."""
        was_cuda = next(self.encoder.parameters()).is_cuda
        self.encoder.to("cpu")
        if was_cuda:  # nothing references the GPU copies now: hand the allocator's blocks back to the driver
            torch.cuda.empty_cache()
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize -> (input_ids `[B, text_len]`, attention_mask `[B, text_len]`), on CPU."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("TextEncoder got an empty list of prompts")
        texts = [clean_prompt(p) for p in prompts]
        if not self._warned_truncation:
            # Tokenizing to text_len + 1 is enough to tell whether the real call will cut something off.
            lengths = self.tokenizer(texts, truncation=True, max_length=self.text_len + 1)["input_ids"]
            too_long = [i for i, ids in enumerate(lengths) if len(ids) > self.text_len]
            if too_long:
                self._warned_truncation = True
                warnings.warn(
                    f"prompt(s) {too_long} exceed text_len={self.text_len} tokens and were truncated "
                    "(as in the original; this warning is shown once)",
                    stacklevel=2,
                )
        out = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            padding_side="right",
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask `[B, L]` -> `[B, L, d_model]` on the encoder's device, padded rows zero."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return zero_padded_rows(hidden, attention_mask)

    # no_grad rather than inference_mode: the embeddings are later inputs to DiT training graphs.
    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        output_device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """prompts (B strings) -> prompt_embeds `[B, text_len, d_model]`, moved to `output_device`/`dtype`."""
        input_ids, attention_mask = self.tokenize(prompts)
        embeds = self.encode_ids(input_ids, attention_mask)
        return embeds.to(
            device=embeds.device if output_device is None else output_device,
            dtype=embeds.dtype if dtype is None else dtype,
        )

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)

    @classmethod
    def from_diffusers_folder(
        cls,
        root: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        text_len: int = 512,
    ) -> TextEncoder:
        """Load `root/text_encoder` (UMT5EncoderModel, config.json + safetensors) and `root/tokenizer`, locally."""
        root = Path(root)
        for sub in ("text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root / sub} does not exist (expected a diffusers-layout folder)")
        encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        return cls(tokenizer, encoder, text_len=text_len, device=device)

    @classmethod
    def from_wan_checkpoint(
        cls,
        checkpoint: str | Path,
        tokenizer_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        text_len: int = 512,
    ) -> TextEncoder:
        """Load the original `models_t5_umt5-xxl-enc-bf16.pth` (or a safetensors file with its keys).

        The original loads the bf16 file into float32 parameters, hence the float32 default.
        """
        if not Path(tokenizer_dir).is_dir():
            raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
        wan_sd = load_wan_t5_state_dict(checkpoint)
        config = umt5_config_from_wan_t5(wan_sd)
        sd = convert_wan_t5_state_dict(wan_sd)
        # Built on the meta device so the 5.7B parameters are never randomly initialised.
        with torch.device("meta"):
            encoder = UMT5EncoderModel(config)
        _load_into(encoder, sd, str(checkpoint), dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(tokenizer, encoder, text_len=text_len, device=device)
