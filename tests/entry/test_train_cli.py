"""train.py: help, one-line errors, the real build path (Wan folders on disk -> registry algorithm -> loop), resume
through the CLI with the real DMD, and what lands in the logdir."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from tests.tiny import tiny_config, tiny_model, tiny_models, tiny_text_encoder
from trainer import train_state as ts
from tests.tiny import tiny_recipe_yaml
from utils.config import REPO_ROOT
from utils.logging import redact, wandb_mode

TINY = tiny_recipe_yaml(lr=1.0e-3, lr_critic=1.0e-3, max_steps=4, log_iters=2, ema_weight=0.9, ema_start_step=1,
                        seed=123)


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na white cat\n")
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + f"data_path: {tmp_path / 'prompts.txt'}\n")
    return path


def test_help_documents_every_flag():
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in ("--config_path", "--logdir", "--no_save", "--no_visualize", "--wandb-save-dir", "--disable-wandb",
                 "--resume", "key=value", "checkpoint_model_XXXXXX", "torchrun"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize("extra, expected", [(["bogus_key=1"], "bogus_key"), (["lr=fast"], "lr")])
def test_bad_config_is_a_one_line_error(recipe, extra, expected):
    out = run_cli("--config_path", str(recipe), "--disable-wandb", *extra)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("train.py: error:")


def test_missing_paths_are_named(tmp_path, recipe, capsys):
    out = run_cli("--config_path", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "nope.yaml" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(SystemExit) as exit_info:  # the real builders: model_root does not exist
        train.main(["--config_path", str(recipe), "--disable-wandb", f"model_root={tmp_path / 'no_models'}"])
    # generator, teacher and critic share one folder by default: the message names it once
    expected = (f"model_root {tmp_path / 'no_models'} does not exist (config key model.model_root; "
                "expected a folder with Wan2.1-T2V-1.3B/)")
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--config_path", str(recipe), "--disable-wandb", f"data_path={tmp_path / 'gone.txt'}"],
                   models=tiny_models)
    assert "gone.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--config_path", str(recipe), "--logdir", str(tmp_path / "x"), "--resume", str(tmp_path / "nil")],
                   models=tiny_models)
    assert "nil" in capsys.readouterr().err


def write_model_root(root, name="TinyWan", vae: bool = False):
    """An original-layout Wan folder with tiny random weights: config.json + safetensors, text encoder + tokenizer,
    and with `vae` a tiny Wan2.1 VAE (the diffusers `vae/` folder the loader also reads; its latent channels are the
    tiny DiT's, with unit latent statistics)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    save_file(tiny_model().state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    text = tiny_text_encoder(dim=tiny_config().text_dim, text_len=tiny_config().text_len)
    text.encoder.save_pretrained(folder / "text_encoder")
    text.tokenizer.save_pretrained(folder / "tokenizer")
    if vae:
        from diffusers import AutoencoderKLWan

        from model.vae import WAN21_VAE_CONFIG
        channels = tiny_config().in_dim
        torch.manual_seed(0)
        AutoencoderKLWan(**dict(WAN21_VAE_CONFIG, base_dim=8, z_dim=channels, latents_mean=[0.0] * channels,
                                latents_std=[1.0] * channels)).save_pretrained(folder / "vae")
    return folder


def test_cli_trains_from_wan_folders_through_the_registry(tmp_path, recipe):
    root = tmp_path / "wan_models"
    write_model_root(root)
    names = [f"model_root={root}", "model_kwargs.model_name=TinyWan", "real_name=TinyWan", "fake_name=TinyWan"]
    logdir = tmp_path / "run"
    out = run_cli("--config_path", str(recipe), "--logdir", str(logdir), "--disable-wandb", "max_steps=2",
                  "wandb_key=SECRET-KEY", *names, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = ts.checkpoint_dir(logdir, 2)
    assert {p.name for p in ckpt.iterdir()} == {"generator.safetensors", "generator_ema.safetensors",
                                                "critic.safetensors", "training_state.pt", "config.yaml",
                                                "config.json"}
    assert "SECRET-KEY" not in (ckpt / "config.yaml").read_text()
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "generator_loss" in rows[0] and "critic_loss" in rows[1]
    # generator_ckpt accepts our checkpoints; max_steps=0 saves the loaded weights unchanged at step 0.
    trainer = train.main(["--config_path", str(recipe), "--logdir", str(tmp_path / "init"), "--disable-wandb",
                          "max_steps=0", f"generator_ckpt={ckpt / 'generator.safetensors'}", *names])
    assert trainer.step == 0
    loaded = load_file(ts.checkpoint_dir(tmp_path / "init", 0) / "generator.safetensors")
    saved = load_file(ckpt / "generator.safetensors")
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_resume_through_the_cli_is_exact_with_the_real_dmd(tmp_path, recipe):
    base = ["--config_path", str(recipe), "--disable-wandb"]
    train.main(base + ["--logdir", str(tmp_path / "full")], models=tiny_models)
    train.main(base + ["--logdir", str(tmp_path / "cut"), "max_steps=2"], models=tiny_models)
    torch.manual_seed(99)
    resumed = train.main(base + ["--logdir", str(tmp_path / "cut"), "--resume"], models=tiny_models)
    assert resumed.step == 4
    for stem in ("generator", "generator_ema", "critic"):
        a = load_file(ts.checkpoint_dir(tmp_path / "full", 4) / f"{stem}.safetensors")
        b = load_file(ts.checkpoint_dir(tmp_path / "cut", 4) / f"{stem}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), stem


def test_resume_flag_without_checkpoint_starts_fresh_and_no_save(tmp_path, recipe, capsys):
    trainer = train.main(["--config_path", str(recipe), "--logdir", str(tmp_path), "--disable-wandb", "--no_save",
                          "max_steps=1", "--resume"], models=tiny_models)
    assert trainer.step == 1 and ts.list_checkpoints(tmp_path) == []
    train.main(["--config_path", str(recipe), "--logdir", str(tmp_path / "y"), "--disable-wandb", "max_steps=1"],
               models=tiny_models)
    with pytest.raises(SystemExit):  # a fresh run must not mix its checkpoints with an earlier run's
        train.main(["--config_path", str(recipe), "--logdir", str(tmp_path / "y"), "--disable-wandb"],
                   models=tiny_models)
    assert "--resume" in capsys.readouterr().err
    args = train.parse_args(["--config_path", "x.yaml", "--resume", "lr=1e-3"])
    assert args.resume == "latest" and args.overrides == ["lr=1e-3"]


def test_wandb_mode_and_redaction():
    cfg = train.load_run_config(train.parse_args(["--config_path", str(REPO_ROOT / "configs/self_forcing_dmd.yaml")]))
    assert wandb_mode(cfg) == "offline" and cfg.logging.logdir.endswith("self_forcing_dmd")
    cfg.logging.wandb_key = "k"
    assert wandb_mode(cfg) == "online"
    cfg.logging.disable_wandb = True
    assert wandb_mode(cfg) is None
    assert redact({"wandb_key": "k", "lr": 1})["wandb_key"] == "<redacted>"


class LatentPrompts:
    """Prompts with clean latents `[F, C, H, W]` (what the GAN's real branch needs)."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> dict:
        latents = torch.randn(6, 4, 4, 6, generator=torch.Generator().manual_seed(i))
        return {"prompts": f"p{i}", "idx": i, "latents": latents}


@pytest.mark.parametrize("warmup", [0, 2])
def test_gan_resume_is_exact(tmp_path, recipe, warmup):
    """Across the discriminator warm-up (a new critic optimizer), and with critic parameters that never get a
    gradient (the trunk's flow head): their optimizer state does not exist and must not be required."""
    from trainer.data import ShardedBatches

    def run(logdir, *extra):
        return train.main(["--config_path", str(recipe), "--logdir", str(logdir), "--disable-wandb", "trainer=gan",
                           f"discriminator_warmup_steps={warmup}", "discriminator_lr_multiplier=3", *extra],
                          models=lambda cfg: tiny_models(cfg, teacher=False),
                          data=lambda cfg, rank, world, seed: ShardedBatches(LatentPrompts(), 1, rank, world, seed))

    full = run(tmp_path / "full")
    assert [g["lr"] for g in full.optimizers["critic"].param_groups] == pytest.approx([1e-3, 3e-3])
    run(tmp_path / "cut", "max_steps=2")
    run(tmp_path / "cut", "--resume")
    for stem in ("generator", "critic", "discriminator_heads"):
        a = load_file(ts.checkpoint_dir(tmp_path / "full", 4) / f"{stem}.safetensors")
        b = load_file(ts.checkpoint_dir(tmp_path / "cut", 4) / f"{stem}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), stem


def test_wandb_offline_run_keeps_the_key_out(tmp_path):
    from utils.logging import RunLogger

    logger = RunLogger(tmp_path, config={"wandb_key": "SECRET-KEY", "lr": 1.0}, wandb_mode="offline",
                       run_name="tiny", progress_bar=False)
    logger.log(1, {"generator_loss": 0.5})
    logger.log(2, {"generator_loss": float("nan")})
    logger.close()
    assert (tmp_path / "wandb").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["generator_loss"] == 0.5 and rows[1]["generator_loss"] == "nan"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"SECRET-KEY" not in path.read_bytes(), path


def test_flags_and_overrides_may_be_intermixed():
    import train
    args = train.parse_args(["--config_path", "c.yaml", "lr=1", "--no_save", "max_steps=2", "--disable-wandb"])
    assert args.overrides == ["lr=1", "max_steps=2"] and args.no_save and args.disable_wandb
