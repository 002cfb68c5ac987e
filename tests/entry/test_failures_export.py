"""scripts/export_hf.py under hostile use: it never deletes its source or an unrelated folder, and an upload to a
server that stops answering ends in bounded time (CPU, tiny weights, a local socket server)."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline.loading import model_folder
from pipeline.loading.hub import push_folder
from scripts import export_hf
from tests.entry.test_export import fake_self_forcing_pt

TINY = ["--num-heads", "2", "--text-len", "16"]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def export(source: Path, output: Path, *extra: str) -> int:
    return export_hf.main([str(source), "--output", str(output), *TINY, *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("where", ["parent", "same"])
def test_an_output_that_holds_the_source_is_refused_even_with_overwrite(tmp_path, capsys, where):
    run = tmp_path / "run"
    run.mkdir()
    source = run / "sf.pt"
    fake_self_forcing_pt(source)
    (run / "notes.txt").write_text("unrelated")
    before = tree(tmp_path)
    output = run if where == "parent" else source
    for extra in ([], ["--overwrite"]):
        assert export(source, output, *extra) == 2
        message = one_line_error(capsys)
        assert "error: --output" in message and (f"holds the input {source}" in message or "is a file" in message)
    assert tree(tmp_path) == before  # the checkpoint and its neighbours are all still there


def test_a_non_empty_folder_that_is_no_export_needs_overwrite(tmp_path, capsys):
    fake_self_forcing_pt(tmp_path / "sf.pt")
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("months of work")
    assert export(tmp_path / "sf.pt", output) == 2
    message = one_line_error(capsys)
    assert "not an earlier export" in message and "--overwrite" in message
    assert tree(output) == {"thesis.tex": b"months of work"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert export(tmp_path / "sf.pt", output, "--overwrite") == 0  # asked for: replaced
    assert model_folder.is_model_folder(output) and not (output / "thesis.tex").exists()


def test_an_earlier_export_or_an_empty_folder_is_replaced_without_asking(tmp_path):
    fake_self_forcing_pt(tmp_path / "sf.pt")
    output = tmp_path / "export"
    assert export(tmp_path / "sf.pt", output) == 0
    first = json.loads((output / "model_index.json").read_text())
    assert export(tmp_path / "sf.pt", output, "--format", "diffusers") == 0
    assert json.loads((output / "model_index.json").read_text())["transformer"] != first["transformer"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(tmp_path / "sf.pt", empty) == 0 and model_folder.is_model_folder(empty)


def test_a_bad_shard_size_is_one_line(tmp_path, capsys):
    fake_self_forcing_pt(tmp_path / "sf.pt")
    assert export(tmp_path / "sf.pt", tmp_path / "o", "--max-shard-size", "5XB") == 2
    assert "--max-shard-size '5XB'" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in accepted:
        conn.close()


def test_an_upload_to_a_server_that_never_answers_ends_in_bounded_time(tmp_path, silent_server):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    tic = time.monotonic()
    with pytest.raises(RuntimeError, match="someone/model: .*Timeout"):
        push_folder(folder, "someone/model", endpoint=silent_server, timeout_s=1.0)
    assert time.monotonic() - tic < 30  # without a read timeout this waited forever
    assert tree(folder) == {"README.md": b"card"}
    # The Hub client's shared session is back to its own settings afterwards.
    from huggingface_hub.utils import _http
    if hasattr(_http, "_GLOBAL_CLIENT_FACTORY"):
        assert _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory


def test_export_push_to_a_silent_hub_exits_1_in_bounded_time_with_the_folder_complete(tmp_path, silent_server,
                                                                                          monkeypatch, capsys):
    import huggingface_hub.constants

    import pipeline.loading.hub
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", silent_server)  # where HF_ENDPOINT would point
    monkeypatch.setattr(pipeline.loading.hub, "HUB_TIMEOUT_S", 1.0)
    fake_self_forcing_pt(tmp_path / "sf.pt")
    out = tmp_path / "export"
    tic = time.monotonic()
    assert export(tmp_path / "sf.pt", out, "--push-to-hub", "someone/model") == 1
    assert time.monotonic() - tic < 60
    err = capsys.readouterr().err
    assert "someone/model" in err and "Timeout" in err and f"the local folder {out} is complete" in err
    assert model_folder.is_model_folder(out) and (out / "README.md").is_file()
