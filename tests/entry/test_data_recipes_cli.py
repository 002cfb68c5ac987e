"""i2v distillation (`configs/self_forcing_dmd.yaml` with `i2v`) trains a few steps through train.py on the real data
path: ODE-pair shards read by `ODEPairDataset`, Wan folders on disk. The recipes as shipped, CausVid's included, are
covered by tests/entry/test_every_recipe_cli.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.entry.test_train_cli import write_model_root
from tests.tiny import tiny_config
from tests.trainer.test_causvid_data import write_pairs
from trainer.data import ShardedBatches
from trainer.ode_pairs import ODEPairDataset
from utils.config import REPO_ROOT

TINY = ["mixed_precision=false", "gradient_checkpointing=false", "sharding_strategy=no_shard", "total_batch_size=null",
        "generator_ckpt=null", "num_frame_per_block=2", "max_steps=2", "dfake_gen_update_ratio=2", "lr=1e-3",
        "lr_critic=1e-3", "model_kwargs.model_name=TinyWan", "real_name=TinyWan", "fake_name=TinyWan", "seed=3"]


@pytest.mark.parametrize("recipe, overrides, frames", [
    ("self_forcing_dmd.yaml", ["i2v=true", "independent_first_frame=true", "image_or_video_shape=[1,7,{c},4,6]",
                               "num_training_frames=7"], 7),
], ids=["i2v"])
def test_recipe_trains_on_ode_pair_shards_through_train_py(tmp_path, monkeypatch, recipe, overrides, frames):
    channels = tiny_config().in_dim
    root = tmp_path / "wan_models"
    write_model_root(root)
    pairs = write_pairs(tmp_path / "pairs", (frames, channels, 4, 6), num_pairs=5)
    batches = []  # what the data path handed the algorithm
    original_next = ShardedBatches.__next__

    def recording_next(self):
        batch = original_next(self)
        batches.append((type(self.dataset), batch))
        return batch
    monkeypatch.setattr(ShardedBatches, "__next__", recording_next)
    logdir = tmp_path / "run"
    trainer = train.main(["--config_path", str(REPO_ROOT / "configs" / recipe), "--logdir", str(logdir),
                          "--disable-wandb", "--no_save", f"model_root={root}", f"ode_data_path={pairs}",
                          *TINY, *(o.format(c=channels) for o in overrides)])
    assert trainer.step == 2
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    logged = {key for row in rows for key in row}
    assert {"generator_loss", "critic_loss"} <= logged
    assert all(torch.isfinite(torch.tensor(row[k])) for row in rows for k in ("generator_loss", "critic_loss")
               if k in row)
    assert batches and all(kind is ODEPairDataset and set(b) == {"prompts", "ode_latent", "idx"} for kind, b in batches)
    # Both networks moved away from their initial weights.
    initial = load_file(root / "TinyWan" / "diffusion_pytorch_model.safetensors")
    for net in (trainer.algorithm.models.generator.model, trainer.algorithm.models.critic.model):
        state = net.state_dict()
        assert any(not torch.equal(state[k].float(), initial[k].float()) for k in initial)
