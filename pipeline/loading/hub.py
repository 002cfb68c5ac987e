"""Model cards and uploads to the Hugging Face Hub."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

# Config keys (sectioned) shown on a model card.
CARD_KEYS = ("trainer", "distillation.distribution_loss", "rollout.denoising_step_list", "rollout.warp_denoising_step",
             "rollout.num_frame_per_block", "rollout.num_training_frames", "distillation.guidance_scale",
             "optimiser.lr", "optimiser.lr_critic", "distillation.dfake_gen_update_ratio", "optimiser.ema_weight",
             "optimiser.ema_start_step", "optimiser.max_steps", "optimiser.total_batch_size", "model.real_name",
             "model.fake_name", "rollout.context_noise", "rollout.kv_cache_grad", "model.lora_rank",
             "optimiser.time_limit_s")


def _dotted_get(values: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    for name in dotted.split("."):
        if not isinstance(values, dict) or name not in values:
            return False, None
        values = values[name]
    return True, values


def _yaml_list(values: list[str]) -> str:
    return "\n".join(f"  - {v}" for v in values)


def model_card(*, repo_name: str, base_model: str, config: dict[str, Any] | None, weights: str, step: int | None,
               causal: dict[str, Any], evaluation: dict[str, Any] | str | None = None, license: str = "apache-2.0",
               include_base: bool = False, example_prompt: str | None = None) -> str:
    """README.md with YAML front matter for the Hub, from the stored training configuration (a config dict, sectioned
    or in the original's flat keys).

    evaluation: markdown written by the caller (e.g. the shapes-world results table), or a flat dict of numbers
    (nested values are left out: a card is read by people, the JSON holds the rest).
    example_prompt: the prompt in the card's command (default: the Wan example of `utils.prompts.DEFAULT_PROMPTS`)."""
    if example_prompt is None:
        from utils.prompts import DEFAULT_PROMPTS
        example_prompt = DEFAULT_PROMPTS["wan"][0]
    tags = ["self-forcing", "video-generation", "autoregressive", "wan2.1", "text-to-video"]
    front = (f"---\nlibrary_name: self-forcing\nlicense: {license}\npipeline_tag: text-to-video\n"
             f"base_model: {base_model}\ntags:\n{_yaml_list(tags)}\n---\n")
    recipe = "unknown (no stored training configuration)"
    rows = ""
    if config:
        from utils.config.original_keys import to_sections
        config = to_sections(config, "the stored training configuration")
        distilled = config.get("trainer") == "score_distillation"
        loss = _dotted_get(config, "distillation.distribution_loss")[1] if distilled else ""
        recipe = f"`trainer: {config.get('trainer')}`" + (f" with `distribution_loss: {loss}`" if loss else "")
        # A network built from dit_config (the shapes world) has no Wan teacher: its real/fake names are defaults.
        built_by_code = bool(_dotted_get(config, "model.dit_config")[1])
        values = {k: _dotted_get(config, k) for k in CARD_KEYS if not (built_by_code and k.endswith("_name"))}
        rows = "\n".join(f"| `{k}` | `{json.dumps(v, ensure_ascii=False)}` |" for k, (found, v) in values.items()
                         if found)
        rows = "| key | value |\n| --- | --- |\n" + rows
    mk = causal.get("model_kwargs", {})
    settings = (f"{len(causal.get('denoising_step_list', []))} denoising steps "
                f"{causal.get('denoising_step_list')} (warped: {causal.get('warp_denoising_step')}), "
                f"{causal.get('num_frame_per_block')} latent frames per block, schedule shift "
                f"{mk.get('timestep_shift')}, KV window {mk.get('local_attn_size')} frames, sink {mk.get('sink_size')}, "
                f"RoPE {mk.get('rope')}")
    evaluation_text = "No evaluation numbers were given to the export."
    if isinstance(evaluation, str):
        evaluation_text = evaluation.strip()
    elif evaluation:
        evaluation_text = "| metric | value |\n| --- | --- |\n" + "\n".join(
            f"| {k} | {v} |" for k, v in evaluation.items() if not isinstance(v, (dict, list)))
    base_note = ("The text encoder, tokenizer and VAE are included." if include_base else
                 f"The text encoder, tokenizer and VAE are those of `{base_model}` (not included; pass "
                 "`--model-root` with its folder, or export with `--include-base`).")
    return f"""{front}
# {repo_name}

A causal, few-step **Self Forcing** video generator (Huang et al., 2025, arXiv 2506.08009) on the Wan2.1
architecture: it generates video block by block with a KV cache, so frames stream while later ones are generated.
Weights: `{weights}`{f' at training step {step}' if step is not None else ''}. {base_note}

## How it was trained

Recipe: {recipe}.

{rows}

Rollout settings stored with the weights: {settings}.

## How to run it

```bash
python inference.py --model <this folder> --prompt "{example_prompt}"
python inference.py --model <this folder> --data_path prompts.txt --output-dir videos/
```

## Evaluation

{evaluation_text}
"""


HUB_TIMEOUT_S = 60.0  # seconds without a byte from the server before an upload gives up


def push_folder(folder: str | Path, repo_id: str, private: bool = False, *, endpoint: str | None = None,
                timeout_s: float | None = None) -> str:
    """Upload `folder` as the repository's content; the token comes from the environment (HF_TOKEN), never logged.
    A server that connects but stops answering for `timeout_s` seconds (default HUB_TIMEOUT_S) ends the upload with
    an error (the Hub client's own default is to wait forever)."""
    timeout_s = HUB_TIMEOUT_S if timeout_s is None else timeout_s
    from huggingface_hub import HfApi
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    api = HfApi(token=token, **({"endpoint": endpoint} if endpoint else {}))  # default: HF_ENDPOINT or the Hub
    try:
        with _http_timeout(timeout_s):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                     commit_message="Upload Self Forcing model")
    except Exception as err:  # network, auth, permissions: one clear line, the local folder stays complete
        raise RuntimeError(f"could not upload {folder} to the Hub repository {repo_id}: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return str(getattr(info, "commit_url", repo_id))


@contextlib.contextmanager
def _http_timeout(timeout_s: float) -> Iterator[None]:
    """The Hub client's HTTP session, with connect and read timeouts, for the duration of the block."""
    from huggingface_hub.utils import _http
    if hasattr(_http, "set_client_factory"):  # huggingface_hub >= 1.0: one shared httpx client
        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

        def factory():
            client = previous()
            client.timeout = type(client.timeout)(timeout_s)
            return client

        _http.set_client_factory(factory)
        try:
            yield
        finally:
            _http.set_client_factory(previous)
        return
    import requests  # huggingface_hub < 1.0: requests sessions, whose calls pass no timeout

    class TimeoutAdapter(requests.adapters.HTTPAdapter):
        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout_s
            return super().send(request, **kwargs)

    def session_factory():
        session = requests.Session()
        session.mount("http://", TimeoutAdapter())
        session.mount("https://", TimeoutAdapter())
        return session

    _http.configure_http_backend(backend_factory=session_factory)
    try:
        yield
    finally:
        _http.configure_http_backend()
