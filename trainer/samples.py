"""Sample videos during training (`sample_every`): the current generator turns fixed prompts into mp4 files.

Every rank runs the sampler (a sharded generator needs all ranks for its forwards); rank 0 writes
`<logdir>/samples/step_XXXXXX-<n>.mp4`. Causal generators roll out with the run's few-step settings, a
bidirectional generator (teacher pre-training) uses 30 Euler steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from utils.prompts import DEFAULT_PROMPTS


def make_sample_fn(cfg: Any, models: Any, logdir: str | Path, rank: int) -> Callable[[int], None] | None:
    if models.codec is None or models.text is None:
        return None
    from pipeline.inference import CausalInferencePipeline, CausalSettings, VideoRequest
    from pipeline.teacher import sample_bidirectional
    from utils.video import write_video
    prompts = list(cfg.logging.sample_prompts) or DEFAULT_PROMPTS[cfg.model.world]
    denoiser = models.generator
    frames = cfg.rollout.image_or_video_shape[1]
    out_dir = Path(logdir) / "samples"

    @torch.no_grad()
    def sample(step: int) -> None:
        net = denoiser.model
        was_training = net.training
        net.eval()
        generator = torch.Generator().manual_seed(cfg.seed or 0)
        if denoiser.uniform_timestep:  # a bidirectional generator (teacher pre-training)
            param = next(net.parameters())
            _, _, c, h, w = cfg.rollout.image_or_video_shape
            noise = torch.randn(len(prompts), frames, c, h, w, generator=generator).to(param.device)
            context = models.text(prompts)
            latents = sample_bidirectional(denoiser, noise, context, models.text.negative(len(prompts)),
                                           sampler="euler", num_steps=30, shift=denoiser.schedule.shift,
                                           guidance_scale=cfg.distillation.guidance_scale, cfg_space="x0").latents
            video = models.codec.decode_to_pixel(latents).float() * 0.5 + 0.5
        else:
            pipe = CausalInferencePipeline(net, models.text, models.codec, denoiser.schedule,
                                           CausalSettings.from_config(cfg, denoiser.schedule))
            video = pipe.generate(prompts, VideoRequest(frames, cfg.inference.height, cfg.inference.width,
                                                        generator=generator)).video
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            for i, clip in enumerate(video.clamp(0, 1).cpu()):
                write_video(out_dir / f"step_{step:06d}-{i}.mp4", clip, fps=cfg.inference.fps)
        net.train(was_training)

    return sample
