"""Export a trained generator as a folder ready for the Hugging Face Hub (and for `inference.py --model DIR`).

    python scripts/export_hf.py logs/run/checkpoint_model_000600 --output exported/
    python scripts/export_hf.py logs/run --output exported/ --include-base wan_models/Wan2.1-T2V-1.3B
    python scripts/export_hf.py self_forcing_dmd.pt --config configs/self_forcing_dmd.yaml --output exported/ \\
        --format diffusers --push-to-hub user/self-forcing-1.3b

The source is a training checkpoint folder (or a logdir: its latest checkpoint), or a weights file (Self-Forcing
`.pt`, safetensors) plus `--config` for the rollout settings. EMA weights are used when present unless
`--weights generator`; LoRA adapters are merged. The Hub token comes from HF_TOKEN; a failed upload leaves the
complete local folder and exits non-zero with one line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.loading.checkpoint import (PICKLE_SUFFIXES, infer_wan_config,  # noqa: E402
                                         load_dit_state_dict)
from pipeline.loading.model_folder import (PIPELINE_CLASS, causal_settings, is_model_folder,  # noqa: E402
                                           save_model_folder)
from utils.config import load_config  # noqa: E402
from utils.errors import InputError, MissingFileError, UserError, one_line, reading  # noqa: E402


def parse_size(text: str) -> int:
    """`--max-shard-size`: bytes, or a number with KB / MB / GB."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    number, factor = text.strip(), 1
    for unit, unit_factor in units.items():
        if number.upper().endswith(unit):
            number, factor = number[:-2].strip(), unit_factor
            break
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise InputError(f"--max-shard-size {text!r}: expected bytes or a number with KB, MB or GB (e.g. "
                         "5GB)") from None
    if size < 1:
        raise InputError(f"--max-shard-size {text!r} must be positive")
    return size


def read_source(path: Path, weights: str, config_path: str | None, num_heads: int | None,
                text_len: int | None):
    """(state dict with Wan keys, WanConfig, Config or None, step or None, weights name)."""
    from model.config import WanConfig
    from trainer.train_state import TRAINING_STATE, latest_checkpoint, load_training_state
    if path.is_dir() and not (path / TRAINING_STATE).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise MissingFileError(f"{path} holds no training checkpoint (checkpoint_model_*/{TRAINING_STATE})")
        path = latest
    cfg, step, wan_config = None, None, None
    if path.is_dir():
        stem = weights if weights != "auto" else (
            "generator_ema" if (path / "generator_ema.safetensors").is_file() else "generator")
        weight_file = path / f"{stem}.safetensors"
        if not weight_file.is_file():
            raise MissingFileError(f"{weight_file} does not exist")
        state, wan_config = load_dit_state_dict(weight_file)
        step = int(load_training_state(path).get("step", 0))
        if (path / "config.yaml").is_file() and not config_path:
            config_path = str(path / "config.yaml")
        if wan_config is None and (path / "config.json").is_file():
            wan_config = WanConfig.from_json(path / "config.json")
    else:
        if weights == "generator" and not path.name.lower().endswith(PICKLE_SUFFIXES):
            raise InputError(f"--weights generator picks the generator entry of a Self-Forcing checkpoint or folder; "
                             f"{path} holds one set of weights (leave --weights auto)")
        stem = "generator_ema" if weights in ("auto", "generator_ema") and path.suffix in (".pt", ".pth") else weights
        try:
            state, wan_config = load_dit_state_dict(path, use_ema=stem == "generator_ema")
        except KeyError:
            if weights != "auto":
                raise
            stem = "generator"
            state, wan_config = load_dit_state_dict(path)
        if stem == "auto":  # a plain weights file: one set of weights, named by the file
            stem = path.name
    if config_path:
        cfg = load_config(config_path)
    from utils.lora import is_lora_state_dict, lora_scaling, merge_lora_state_dict
    if is_lora_state_dict(state):
        if cfg is None or cfg.model.lora_rank < 1:
            raise InputError(f"{path} holds LoRA adapters; pass --config with its lora_rank / lora_alpha")
        state = merge_lora_state_dict(state, lora_scaling(cfg.model.lora_rank, cfg.model.lora_alpha))
    if wan_config is None and cfg is not None and cfg.model.dit_config:
        # A network built from dit_config (the shapes world): the config, not the weights, says its heads, text
        # length and what its head predicts.
        from shapes.components import shapes_wan_config
        wan_config = shapes_wan_config(cfg)
    if wan_config is None:
        wan_config = infer_wan_config(state, num_heads=num_heads, text_len=512 if text_len is None else text_len,
                                      source=str(path))
    else:
        # The flags fill in what bare weights cannot say; a source that states it keeps its own value.
        for flag, given, stored in (("--num-heads", num_heads, wan_config.num_heads),
                                    ("--text-len", text_len, wan_config.text_len)):
            if given is not None and given != stored:
                raise InputError(f"{flag} {given}: {path} states its own ({stored}); the flag applies only to "
                                 "weights without a stored config")
    return state, wan_config, cfg, step, stem


def base_components(base: Path, text_len: int) -> dict:
    """text_encoder / tokenizer / vae (or codec) of a base model, ready to save into the export."""
    if is_model_folder(base):
        return {"copy_from": base}
    from pipeline.loading.wan_components import load_wan_text_encoder, load_wan_vae
    text = load_wan_text_encoder(base, text_len=text_len)
    return {"text_encoder": text.encoder, "tokenizer": text.tokenizer, "vae": load_wan_vae(base).vae}


def card_evaluation(path: Path) -> dict | str:
    """The card's evaluation: a shapes-world evaluation (scripts/evaluate_shapes.py) as its results table and the
    paper's claims checked on it; any other JSON as its flat numbers."""
    with reading(f"--eval-json {path}"):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of evaluation numbers, got {type(data).__name__}")
    from scripts.shapes_results import FORMAT, claims, load_eval, markdown_table
    if data.get("format") != FORMAT:
        return data
    data = load_eval(path)
    return markdown_table(data) + "\n\n" + "\n".join(f"- {sentence}" for sentence in claims(data))


def check_output(output: Path, inputs: list[str | None], overwrite: bool) -> None:
    """The export replaces `output` as a whole: refuse what that would destroy. Never an input (the checkpoint, the
    base model, the config) or a folder holding one; a non-empty folder that is not an earlier export only with
    `--overwrite`."""
    target = output.resolve()
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file; expected a folder to write the export into")
    for given in filter(None, inputs):
        source = Path(given).resolve()
        if source == target or target in source.parents:
            raise InputError(f"--output {output} holds the input {given}: exporting there would delete it; choose "
                             f"another --output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    index = output / "model_index.json"
    try:
        earlier_export = json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        earlier_export = False
    if not earlier_export and not overwrite:
        raise InputError(f"--output {output} is a non-empty folder that is not an earlier export (no {index.name} of "
                         f"a {PIPELINE_CLASS}); its content would be replaced: pass --overwrite, or choose another "
                         "--output")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="training checkpoint folder, logdir, or weights file (.pt / .safetensors)")
    p.add_argument("--output", required=True, help="folder to write; an earlier export there is replaced atomically, "
                   "any other non-empty folder only with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output folder that is not an earlier export")
    p.add_argument("--weights", choices=["auto", "generator", "generator_ema"], default="auto",
                   help="which weights to export (default: EMA when present)")
    p.add_argument("--config", help="training config for a bare weights file (rollout settings, card)")
    p.add_argument("--format", choices=["original", "diffusers"], default="original",
                   help="transformer key layout: original Wan names (default) or diffusers WanTransformer3DModel")
    p.add_argument("--include-base", help="copy the text encoder, tokenizer and VAE of this base model folder")
    p.add_argument("--base-model", default="Wan-AI/Wan2.1-T2V-1.3B", help="base model named in the card")
    p.add_argument("--max-shard-size", default="5GB", help="shard the transformer above this size (default 5GB)")
    p.add_argument("--num-heads", type=int, help="attention heads, when no config.json says (default dim/128)")
    p.add_argument("--text-len", type=int, help="text tokens, when no config.json says (default 512)")
    p.add_argument("--eval-json", help="JSON of evaluation numbers to put in the model card")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder (token from HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = p.parse_args(argv)
    try:
        if args.private and not args.push_to_hub:
            raise InputError("--private makes the Hub repository of --push-to-hub private; without --push-to-hub "
                             "nothing is uploaded")
        check_output(Path(args.output), [args.source, args.include_base, args.config, args.eval_json], args.overwrite)
        max_shard_bytes = parse_size(args.max_shard_size)
        state, wan_config, cfg, step, stem = read_source(Path(args.source), args.weights, args.config, args.num_heads,
                                                              args.text_len)
        causal = causal_settings(cfg if cfg is not None else load_config())
        extra = base_components(Path(args.include_base), wan_config.text_len) if args.include_base else {}
        copy_from = extra.pop("copy_from", None)
        evaluation = card_evaluation(Path(args.eval_json)) if args.eval_json else None
        from pipeline.loading.hub import model_card
        from utils.config import config_to_dict
        from utils.prompts import DEFAULT_PROMPTS
        example = DEFAULT_PROMPTS[cfg.model.world if cfg is not None else "wan"][0]
        card = model_card(repo_name=args.push_to_hub or Path(args.output).name, base_model=args.base_model,
                          config=config_to_dict(cfg) if cfg is not None else None, weights=stem, step=step,
                          causal=causal, evaluation=evaluation, include_base=bool(args.include_base),
                          example_prompt=example)
        out = save_model_folder(args.output, transformer=state, wan_config=wan_config, causal=causal,
                                transformer_format=args.format, max_shard_bytes=max_shard_bytes,
                                extra_files={"README.md": card}, index_extra={"base_model": args.base_model},
                                **extra)
        if copy_from is not None:
            index = json.loads((out / "model_index.json").read_text())
            base_index = json.loads((copy_from / "model_index.json").read_text())
            for part in ("text_encoder", "tokenizer", "vae", "codec"):
                if (copy_from / part).is_dir():
                    shutil.copytree(copy_from / part, out / part, dirs_exist_ok=True)
                    index[part] = base_index.get(part)
            (out / "model_index.json").write_text(json.dumps(index, indent=2))
    except UserError as err:  # only the project's own errors: a bug keeps its traceback
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if args.push_to_hub:
        from pipeline.loading.hub import push_folder
        try:
            print(f"uploaded: {push_folder(out, args.push_to_hub, private=args.private)}")
        except RuntimeError as err:
            print(f"error: {err} (the local folder {out} is complete)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
