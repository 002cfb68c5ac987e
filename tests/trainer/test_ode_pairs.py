"""ODE pairs (trainer/ode_pairs.py, scripts/generate_ode_pairs.py): the shard format, its validation, generation on a
tiny teacher, sharding over ranks, and the ODE trainer consuming the result through build_data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.denoiser import Denoiser
from pipeline.schedule import FlowMatchSchedule
from pipeline.teacher import ode_pair_timesteps
from scripts import generate_ode_pairs as cli
from tests.ranks import free_port
from tests.tiny import TinyText, save_tiny_model_folder, tiny_model, tiny_train_config
from trainer import ode_pairs
from trainer.data import ShardedBatches, build_data
from trainer.ode_pairs import INDEX, ODEPairDataset, OdePairWriter, clear_output, finalize_index, shard_name

REPO = Path(__file__).resolve().parents[2]
TIMESTEPS = [1000.0, 960.0, 888.89, 727.27, 0.0]
ENTRY = (5, 2, 3, 2, 4)  # [K, F, C, H, W]
PROMPTS = ["a red circle moves left", "a blue square", "the cat jumps", "a small dog", "a green triangle"]
# Generation settings shared by the CLI tests: 8 Euler steps keep the entries on the shift-8 warped 1000/750/500/250.
GEN_ARGS = ["--num-frames", "4", "--height", "8", "--width", "8", "--num-steps", "8", "--record", "0", "2", "4", "6",
            "8", "--shard-size", "2", "--device", "cpu", "--seed", "3", "--negative-prompt", "a cat"]


def _pairs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *ENTRY, generator=torch.Generator().manual_seed(seed))


def _write(folder: Path, chunks=(2, 4, 1), shard_size: int = 3, dtype=torch.bfloat16, rank: int = 0,
           timesteps=TIMESTEPS):
    prompts = [f"prompt {i} é ü 猫" for i in range(sum(chunks))]
    data = _pairs(len(prompts))
    with OdePairWriter(folder, rank, shard_size, timesteps=timesteps, dtype=dtype) as writer:
        start = 0
        for n in chunks:
            writer.add(prompts[start:start + n], data[start:start + n])
            start += n
    return prompts, data, writer.written


def test_writer_and_dataset_round_trip(tmp_path):
    prompts, data, written = _write(tmp_path)
    assert [p.name for p in written] == [shard_name(0, i) for i in range(3)]
    index = finalize_index(tmp_path, teacher="tiny", sampler={"name": "euler"})
    assert [s["count"] for s in index["shards"]] == [3, 3, 1] and index["num_pairs"] == 7
    assert json.loads((tmp_path / INDEX).read_text()) == index
    ds = ODEPairDataset(tmp_path)
    assert len(ds) == 7 and ds.latent_shape == ENTRY and ds.dtype == "bfloat16"
    assert ds.timesteps == pytest.approx(TIMESTEPS, abs=1e-3)
    for i in range(7):
        item = ds[i]
        assert set(item) == {"prompts", "ode_latent", "idx"} and item["idx"] == i
        assert item["prompts"] == prompts[i]
        assert item["ode_latent"].dtype == torch.float32 and tuple(item["ode_latent"].shape) == ENTRY
        assert torch.equal(item["ode_latent"], data[i].to(torch.bfloat16).float())
    assert ds[-1]["prompts"] == prompts[-1] and ds[-1]["idx"] == 6
    with pytest.raises(IndexError):
        ds[7]
    batch = next(ShardedBatches(ds, batch_size=4, shuffle=False))
    assert batch["ode_latent"].shape == (4, *ENTRY) and batch["prompts"] == prompts[:4]


def test_float32_storage_is_exact(tmp_path):
    _, data, _ = _write(tmp_path, chunks=(5,), shard_size=2, dtype=torch.float32)
    finalize_index(tmp_path)
    ds = ODEPairDataset(tmp_path)
    assert ds.dtype == "float32" and torch.equal(torch.stack([ds[i]["ode_latent"] for i in range(5)]), data)


def test_dataset_reads_one_pair_lazily(tmp_path, monkeypatch):
    _write(tmp_path)
    finalize_index(tmp_path)
    calls = []

    class SpySlice:
        def __init__(self, inner):
            self.inner = inner

        def __getitem__(self, key):
            calls.append(key)
            return self.inner[key]

    real_open = ode_pairs.safe_open

    def spy_open(path, framework):
        handle = real_open(path, framework=framework)

        class Handle:
            metadata = handle.metadata
            keys = handle.keys

            def get_slice(self, name):
                return SpySlice(handle.get_slice(name))

            def get_tensor(self, name):
                raise AssertionError("the whole shard tensor was loaded")
        calls.append(Path(path).name)
        return Handle()

    monkeypatch.setattr(ode_pairs, "safe_open", spy_open)
    ds = ODEPairDataset(tmp_path, verify=False)
    assert calls == []  # nothing opened up front without verification
    ds[4]
    assert calls == [shard_name(0, 1), 1]  # pair 4 = row 1 of the second shard, read alone


def _corrupt_index(folder: Path, **changes) -> None:
    index = json.loads((folder / INDEX).read_text())
    for key, value in changes.items():
        if value is None:
            del index[key]
        else:
            index[key] = value
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("changes, error, match", [
    (dict(format="lmdb"), ValueError, "'format'"),
    (dict(timesteps=None), KeyError, "'timesteps'"),
    (dict(timesteps=[1000, 750, 500, 250, 10]), ValueError, "end with 0"),
    (dict(timesteps=[1000, 0]), ValueError, "2 timesteps for trajectories of 5"),
    (dict(num_pairs=9), ValueError, "'num_pairs'"),
    (dict(latent_shape=[5, 2, 3, 2]), ValueError, "'latent_shape'"),
    (dict(shards=[{"file": shard_name(0, 0), "count": 3}, {"file": shard_name(0, 7), "count": 4}]),
     FileNotFoundError, shard_name(0, 7)),
    (dict(shards=[{"file": shard_name(0, 0), "count": 2}, {"file": shard_name(0, 1), "count": 5}]),
     ValueError, "says 2 of"),
])
def test_index_validation_errors_name_the_file_and_key(tmp_path, changes, error, match):
    _write(tmp_path)
    finalize_index(tmp_path)
    _corrupt_index(tmp_path, **changes)
    with pytest.raises(error, match=match) as info:
        ODEPairDataset(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_folder_index_or_shard_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ODEPairDataset(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=INDEX):
        ODEPairDataset(tmp_path)
    _write(tmp_path)
    finalize_index(tmp_path)
    (tmp_path / shard_name(0, 2)).unlink()
    with pytest.raises(FileNotFoundError, match=shard_name(0, 2)):
        ODEPairDataset(tmp_path)
    (tmp_path / shard_name(0, 2)).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"{shard_name(0, 2)} is not a readable safetensors file"):
        ODEPairDataset(tmp_path)


def test_writer_rejects_inconsistent_pairs(tmp_path):
    writer = OdePairWriter(tmp_path, timesteps=TIMESTEPS)
    with pytest.raises(ValueError, match=r"\[3, K, F, C, H, W\]"):
        writer.add(["a", "b", "c"], _pairs(2))
    with pytest.raises(ValueError, match="timesteps has 5"):
        writer.add(["a"], torch.randn(1, 4, *ENTRY[1:]))
    writer.add(["a"], _pairs(1))
    with pytest.raises(ValueError, match="differs from the earlier"):
        writer.add(["b"], torch.randn(1, 5, 2, 3, 2, 2))
    with pytest.raises(ValueError, match="end with 0"):
        OdePairWriter(tmp_path, timesteps=[1000, 500])


def test_index_counts_every_rank_from_the_shards(tmp_path):
    _write(tmp_path, chunks=(3,), shard_size=2, rank=0)  # 2 + 1
    _write(tmp_path, chunks=(1,), shard_size=2, rank=2)  # a later rank's single pair is not "the total"
    index = finalize_index(tmp_path)
    assert [s["file"] for s in index["shards"]] == [shard_name(0, 0), shard_name(0, 1), shard_name(2, 0)]
    assert index["num_pairs"] == 4 and len(ODEPairDataset(tmp_path)) == 4


def test_finalize_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ODE-pair shards"):
        finalize_index(tmp_path)
    _write(tmp_path, chunks=(1,))
    with OdePairWriter(tmp_path, rank=1, timesteps=TIMESTEPS) as w:
        w.add(["x"], torch.randn(1, 5, 2, 3, 2, 2))
    with pytest.raises(ValueError, match=shard_name(1, 0)):
        finalize_index(tmp_path)


def test_clear_output_refuses_then_removes_old_pairs(tmp_path):
    _write(tmp_path)
    finalize_index(tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="--overwrite"):
        clear_output(tmp_path, overwrite=False, delete=False)
    clear_output(tmp_path, overwrite=True, delete=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_config_steps_are_checked_against_the_stored_timesteps(tmp_path):
    stored = ode_pair_timesteps(48, 8.0, [0, 12, 24, 36, 48])
    _write(tmp_path, timesteps=stored)
    finalize_index(tmp_path, timesteps=stored)
    good = tiny_train_config(denoising_step_list=[1000, 750, 500, 250, 0], model_kwargs={"timestep_shift": 8.0})
    ds = ODEPairDataset(tmp_path)
    ds.check_timesteps(ode_pairs.config_trajectory_timesteps(good))
    for bad in (tiny_train_config(denoising_step_list=[1000, 750, 500, 250, 0]),  # shift 5 generator
                tiny_train_config(denoising_step_list=[1000, 750, 500, 250]),  # no clean entry
                tiny_train_config(denoising_step_list=[1000, 750, 500, 250, 0], warp_denoising_step=False,
                                  model_kwargs={"timestep_shift": 8.0})):
        with pytest.raises(ValueError, match="denoising_step_list"):
            ds.check_timesteps(ode_pairs.config_trajectory_timesteps(bad))


# ------------------------------------------------------------------------------------------ generation

@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ode")
    save_tiny_model_folder(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    return root


@pytest.fixture(scope="module")
def one_rank_pairs(teacher_folder):
    out = teacher_folder / "one_rank"
    code = cli.main(["--teacher", str(teacher_folder / "model"), "--prompts", str(teacher_folder / "prompts.txt"),
                     "--output", str(out), *GEN_ARGS])
    assert code == 0
    return out


def test_cli_writes_a_dataset_the_ode_trainer_trains_on(teacher_folder, one_rank_pairs):
    from pipeline.loading.model_folder import load_text_encoder, load_transformer
    from trainer.base import Models
    from trainer.builders import PromptEncoder
    from trainer.ode import ODERegression
    ds = ODEPairDataset(one_rank_pairs)
    assert len(ds) == len(PROMPTS) and sorted(ds[i]["prompts"] for i in range(len(ds))) == sorted(PROMPTS)
    assert ds.latent_shape == (5, 4, 12, 4, 4)  # 8x8 pixels / the folder codec's factor 2; 12 codec channels
    assert ds.timesteps == pytest.approx(ode_pair_timesteps(8, 8.0, [0, 2, 4, 6, 8]), abs=1e-3)
    assert ds.index["sampler"]["negative_prompt"] == "a cat" and ds.index["sampler"]["guidance_scale"] == 6.0
    first = ds[0]["ode_latent"]
    assert not torch.allclose(first[0], first[-1])  # the noise and the clean end differ
    cfg = tiny_train_config(trainer="ode", ode_data_path=str(one_rank_pairs), batch_size=2,
                            denoising_step_list=[1000, 750, 500, 250, 0], model_kwargs={"timestep_shift": 8.0},
                            image_or_video_shape=[2, 4, 12, 4, 4], num_training_frames=4)
    data = build_data(cfg)
    batch = next(data)
    assert batch["ode_latent"].shape == (2, *ds.latent_shape)
    net, _ = load_transformer(teacher_folder / "model")
    net.requires_grad_(True)
    encoder = load_text_encoder(teacher_folder / "model", text_len=net.config.text_len)
    models = Models(generator=Denoiser(net, FlowMatchSchedule(8.0)), text=PromptEncoder(encoder, ""))
    loss, _ = ODERegression(cfg, models).generator_loss(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="does not match"):
        build_data(tiny_train_config(trainer="ode", ode_data_path=str(one_rank_pairs),
                                     denoising_step_list=[1000, 750, 500, 250, 0]))
    with pytest.raises(ValueError, match="ode_data_path"):
        build_data(tiny_train_config(trainer="ode"))
    with pytest.raises(FileNotFoundError, match="absent"):
        build_data(tiny_train_config(trainer="ode", ode_data_path=str(teacher_folder / "absent")))


def test_cli_errors_and_help(teacher_folder, one_rank_pairs, capsys):
    base = ["--teacher", str(teacher_folder / "model"), "--prompts", str(teacher_folder / "prompts.txt")]
    assert cli.main([*base, "--output", str(one_rank_pairs), *GEN_ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*base, "--output", str(teacher_folder / "x"), *GEN_ARGS, "--record", "0", "4"]) == 2
    assert "clean sample" in capsys.readouterr().err
    assert cli.main([*base, "--output", str(teacher_folder / "x"), *GEN_ARGS, "--height", "6"]) == 2
    assert "spatial factor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--teacher", "--model-root", "--teacher-name", "--prompts", "--output", "--num-frames", "--height",
                 "--width", "--num-steps", "--shift", "--guidance-scale", "--record", "--negative-prompt",
                 "--batch-size", "--seed", "--shard-size", "--max-prompts", "--device", "--dtype"):
        assert flag in text


def test_python_api_is_deterministic_per_prompt_across_batch_sizes(tmp_path):
    teacher = Denoiser(tiny_model(1), FlowMatchSchedule(8.0), uniform_timestep=True)
    text = TinyText(teacher.model.config.text_dim)
    kwargs = dict(latent_shape=(4, 4, 2, 2), num_steps=4, record_steps=(0, 2, 4), storage_dtype=torch.float32,
                  progress=False, negative_prompt="neg", seed=1)
    outs = []
    for batch_size, prompts in ((1, PROMPTS), (2, PROMPTS), (1, PROMPTS[:3])):
        out = cli.generate_ode_pairs(teacher, text, prompts, tmp_path / f"b{batch_size}-{len(prompts)}",
                                     batch_size=batch_size, shard_size=2, **kwargs)
        ds = ODEPairDataset(out)
        outs.append({ds[i]["prompts"]: ds[i]["ode_latent"] for i in range(len(ds))})
    assert len(outs[0]) == len(PROMPTS) and outs[0].keys() == outs[1].keys()
    for p in PROMPTS:
        torch.testing.assert_close(outs[1][p], outs[0][p], rtol=1e-5, atol=1e-5)
    for p in PROMPTS[:3]:  # the noise depends on the prompt's index only, not on what else is generated
        torch.testing.assert_close(outs[2][p], outs[0][p], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0][PROMPTS[0]], outs[0][PROMPTS[1]])


@pytest.mark.distributed
def test_two_ranks_write_the_same_pairs_as_one(teacher_folder, one_rank_pairs):
    out = teacher_folder / "two_ranks"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "scripts" / "generate_ode_pairs.py"), "--teacher", str(teacher_folder / "model"),
           "--prompts", str(teacher_folder / "prompts.txt"), "--output", str(out), *GEN_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ODEPairDataset(one_rank_pairs), ODEPairDataset(out)
    assert len(two) == len(one) == len(PROMPTS)
    files = [s["file"] for s in two.index["shards"]]
    assert any(f.startswith("shard-r000") for f in files) and any(f.startswith("shard-r001") for f in files)
    by_prompt = {two[i]["prompts"]: two[i]["ode_latent"] for i in range(len(two))}
    assert sorted(by_prompt) == sorted(PROMPTS)  # none dropped, none duplicated
    for i in range(len(one)):
        item = one[i]
        assert torch.equal(by_prompt[item["prompts"]], item["ode_latent"]), item["prompts"]


@pytest.mark.parametrize("overrides", [["trainer=gan"], ["trainer=diffusion"], ["distribution_loss=causvid"]])
def test_data_trained_recipes_read_clean_latents_from_the_pairs(tmp_path, overrides):
    from trainer.common import clean_latents
    from trainer.data import build_data
    from utils.config import load_config
    _write(tmp_path / "pairs")
    finalize_index(tmp_path / "pairs")
    cfg = load_config(None, [f"ode_data_path={tmp_path / 'pairs'}", "batch_size=2", *overrides])
    batch = next(build_data(cfg))
    assert len(batch["prompts"]) == 2
    latents = clean_latents(batch, "test")
    torch.testing.assert_close(latents, batch["ode_latent"][:, -1])
    with pytest.raises(ValueError, match="ode_data_path"):
        build_data(load_config(None, overrides))
