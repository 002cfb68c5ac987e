"""Write a real-size Wan2.1-T2V-1.3B model folder with RANDOM weights, for speed and memory runs on a GPU machine
(real weights never travel there; timing and memory do not depend on weight values).

    python benchmarks/random_wan_folder.py --out runs/wan_random/Wan2.1-T2V-1.3B
    python inference.py --model runs/wan_random/Wan2.1-T2V-1.3B --prompt "..." --height 480 --width 832
    python train.py --config_path configs/self_forcing_dmd_1.3b_teacher.yaml model_root=runs/wan_random ...

Layout: the exported folder (transformer/ in diffusers format, text_encoder/, tokenizer/, vae/, model_index.json), which
both `inference.py --model` and the training `model_root` read. The DiT and the VAE are the real architectures. The text
encoder is UMT5-XXL's architecture with `--t5-layers` of its 24 layers (default all 24: 5.7 B parameters, the real
memory footprint); the tokenizer is a word tokenizer built in code (the real SentencePiece vocabulary is a download).
`--tiny`: the same layout and architectures at toy widths (a few MB, CPU), for harness checks such as
`benchmarks/user_path.py --tiny`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("a the cat dog walks runs on in through city street forest beach at night day sunset snow rain red blue green "
         "camera slowly fast close up wide shot of with and").split()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="model folder to write (e.g. <model_root>/Wan2.1-T2V-1.3B)")
    p.add_argument("--t5-layers", type=int, default=24, help="UMT5-XXL encoder layers to keep (default: all 24)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where random weights are drawn (GPU is much faster for 5.7 B parameters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy widths of every part (CPU harness checks)")
    args = p.parse_args(argv)

    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    from model.config import WAN_1_3B, WanConfig
    from model.text_encoder import build_word_tokenizer, umt5_xxl_config
    from model.vae import WAN21_VAE_CONFIG
    from model.wan import WanDiT
    from pipeline.loading.model_folder import save_model_folder

    tic = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = umt5_xxl_config()
    config.num_layers = args.t5_layers
    dit_config, vae_config, dtype = WAN_1_3B, {}, torch.bfloat16  # diffusers' defaults are Wan2.1's VAE
    if args.tiny:
        dit_config = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16,
                               in_dim=16, out_dim=16)
        config.update(dict(d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=min(args.t5_layers, 1),
                           relative_attention_num_buckets=8, vocab_size=len(WORDS) + 8))
        vae_config, dtype = dict(WAN21_VAE_CONFIG, base_dim=8), torch.float32
    with device:
        dit = WanDiT(dit_config)
        dit.init_weights()
    dit = dit.to(dtype)
    with device:
        t5 = UMT5EncoderModel(config).to(dtype).eval()
    vae = AutoencoderKLWan(**vae_config)
    height, width = (64, 96) if args.tiny else (480, 832)
    causal = {"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True, "num_frame_per_block": 3,
              "independent_first_frame": False, "context_noise": 0.0, "negative_prompt": "", "height": height,
              "width": width, "fps": 16, "decoder": "wan", "image_or_video_shape": [1, 21, 16, height // 8, width // 8],
              "model_kwargs": {"timestep_shift": 5.0, "local_attn_size": -1, "sink_size": 0, "rope": "absolute"}}
    save_model_folder(args.out, transformer=dit, wan_config=dit.config, causal=causal, text_encoder=t5,
                      tokenizer=build_word_tokenizer(WORDS), vae=vae, transformer_format="diffusers",
                      index_extra={"note": "random weights, for speed and memory measurements only"})
    n_dit, n_t5 = (sum(p.numel() for p in m.parameters()) / 1e9 for m in (dit, t5))
    print(f"wrote {args.out} in {time.perf_counter() - tic:.1f} s (DiT {n_dit:.2f} B, "
          f"UMT5 {n_t5:.2f} B parameters, random)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
