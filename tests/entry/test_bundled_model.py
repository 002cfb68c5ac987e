"""The embedded default model (`assets/shapes_world`, the shapes-world Self Forcing DMD student): it loads through
the same paths users take (`python inference.py`, `python demo.py` with no --model) and its videos score on the
world's evaluator like a trained model. Numbers come from generating and scoring here, on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

import demo
import inference
from pipeline.inference import VideoRequest
from shapes import evaluate, sample_scenes, short_prompt
from utils.video import read_video
from webdemo.server import create_app

NUM_PROMPTS = 64  # the issue's bar is judged on 64 held-in prompts, as in the GPU evaluation
ISSUE_BAR = 0.80  # attribute accuracy on held-in prompts at the training length


@pytest.fixture(scope="module")
def pipeline():
    args = inference.build_parser().parse_args([])
    pipe, cfg, source, _ = inference.build_pipeline(args, torch.device("cpu"), torch.float32)
    assert source == str(inference.DEFAULT_MODEL)
    return pipe, cfg


@pytest.fixture(scope="module")
def held_in_report(pipeline):
    pipe, cfg = pipeline
    scenes = sample_scenes(NUM_PROMPTS, torch.Generator().manual_seed(0), split="train")
    frames, height, width = cfg.rollout.num_training_frames, cfg.inference.height, cfg.inference.width
    request = VideoRequest(frames, height, width, generator=torch.Generator().manual_seed(1))
    out = pipe.generate([short_prompt(s) for s in scenes], request)
    assert out.video.shape == (NUM_PROMPTS, frames, 3, height, width)
    return evaluate(out.video.float(), scenes, value_range=(0, 1), layout="BTCHW")


def test_bare_inference_writes_a_video_per_builtin_prompt(tmp_path):
    assert inference.main(["--output-dir", str(tmp_path)]) == 0
    videos = sorted(tmp_path.glob("*.mp4"))
    assert len(videos) == len(inference.BUILTIN_PROMPTS)
    frames, _ = read_video(videos[0])
    assert frames.shape[1:] == (32, 32, 3) and frames.shape[0] >= 12
    stats = json.loads(sorted(tmp_path.glob("stats_*.json"))[0].read_text())
    assert stats["prompt"] == inference.BUILTIN_PROMPTS[0]


@pytest.mark.slow
def test_bundled_model_draws_the_prompted_scene(held_in_report):
    """Far above an untrained or mis-loaded model (random weights: ~0.2 attribute accuracy, no background right)."""
    r = held_in_report
    assert r["background_accuracy"] >= 0.95
    assert r["colour_accuracy"] >= 0.75
    assert r["frame_quality"] >= 0.85
    assert r["attribute_accuracy"] >= 0.65


@pytest.mark.slow
def test_bundled_model_meets_the_attribute_accuracy_bar(held_in_report):
    """The 0.80 bar. The bundled DMD student scored 0.89 on the H100 (bf16, benchmarks/results/shapes_recipe_h100.json)
    and 0.89 here (fp32). The initial direction read back is the prompted one for 0.72 of the shapes here (chance
    0.125; the student of shapes_recipe_baselines_h100.json, whose teacher had no arrow of time: 0.22); whole-clip
    motion is right far less often (motion_correct 0.11 on the H100), which this test does not claim."""
    assert held_in_report["attribute_accuracy"] >= ISSUE_BAR
    assert held_in_report["direction_accuracy"] >= 0.5


def test_demo_serves_the_bundled_model_out_of_the_box(tmp_path):
    service = demo.load_service(demo.build_parser().parse_args(["--output-dir", str(tmp_path), "--device", "cpu"]))
    assert service.source == str(inference.DEFAULT_MODEL) and service.default_prompt == inference.BUILTIN_PROMPTS[0]
    client = create_app(service).test_client()
    started = client.post("/api/start", json={"prompt": service.default_prompt, "seed": "3", "fps": 8, "blocks": 2})
    assert started.status_code == 200, started.get_json()
    job = service.current
    assert job is not None and job.finished.wait(120)
    assert job.state == "done", job.state
    frames, fps = read_video(job.video_path)
    assert frames.shape == (6, 32, 32, 3) and fps == pytest.approx(8)
