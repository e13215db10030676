"""Never lose a user's data: what `--force` may replace, leftovers of interrupted writes, SIGTERM mid-write, and a
fine-tuning run whose first checkpoint save was cut short."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxlora.errors import UsageError
from jaxlora.staging import MARKER, raise_interrupt, recognised_folder, staged, staged_files, uninterrupted


def test_force_replaces_only_our_own_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    for force in (False, True):
        with pytest.raises(UsageError), staged(user, force=force) as staging:
            (staging / "x").write_text("new")
    assert [p.name for p in user.iterdir()] == ["thesis.tex"]
    with staged(tmp_path / "ours") as staging:
        (staging / "a.txt").write_text("first")
    assert (tmp_path / "ours" / MARKER).is_file() and recognised_folder(tmp_path / "ours") == "jaxlora output"
    with staged(tmp_path / "ours", force=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [MARKER, "b.txt"]
    # A PEFT adapter folder (written by PEFT itself, no marker) is recognised too; with a stray file of the
    # user's in it, it is not.
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"")
    assert recognised_folder(peft) == "PEFT adapter"
    (peft / "notes.md").write_text("mine")
    assert recognised_folder(peft) is None
    # Files: replaced with force only when the caller recognises them.
    (tmp_path / "model.onnx").write_text("not ours")
    with pytest.raises(UsageError, match="not jaxlora output"), staged_files(tmp_path / "model.onnx", force=True):
        pass
    with staged_files(tmp_path / "model.onnx", force=True, recognise=lambda p: "ours") as folder:
        (folder / "model.onnx").write_text("ours now")
    assert (tmp_path / "model.onnx").read_text() == "ours now"


def test_the_current_folder_its_parents_and_links_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for dst in (".", "..", str(work), str(tmp_path), "/"):
        with pytest.raises(UsageError, match="current folder"), staged(dst, force=True):
            pass
    (tmp_path / "target").mkdir()
    (work / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UsageError, match="symbolic link"), staged(work / "link", force=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "target"]


def test_an_interrupted_write_leaves_nothing_and_the_next_run_clears_old_leftovers(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged(tmp_path / "out") as staging:
        (staging / "half").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # What a SIGKILL leaves (no chance to clean up) is ours by its name, and goes on the next write to `out`;
    # look-alikes for other names, and the user's files, stay.
    for name in (".out.partial-0123abcd", ".out.old-89abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("stale")
    keep = [".other.partial-0123abcd", ".out.partial-mine", "out.partial-0123abcd"]
    for name in keep:
        (tmp_path / name).write_text("not a leftover of ours")
    with staged(tmp_path / "out") as staging:
        (staging / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["out"])


def test_a_signal_inside_uninterrupted_waits_for_the_block_to_finish():
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            with uninterrupted():
                with uninterrupted():  # nested: held until the outermost block ends
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # the handler has run by now
                    finished.append("inner")
                finished.append("outer")
        assert raised.value.args == (signal.SIGTERM,)
        assert finished == ["inner", "outer"]
        # Outside the block the signal interrupts at once, and nothing is left held from before.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        with uninterrupted():
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_param_group_save_completes_before_a_signal_ends_the_run(tmp_path):
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxlora.checkpoint import save_param_group

    group = {f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(16)}  # 64 MB: a save of ~0.1 s or more
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(KeyboardInterrupt):
            save_param_group(tmp_path, "layers_0", group)
            time.sleep(5)  # only if the signal came after the save: it interrupts this sleep instead
    finally:
        signal.signal(signal.SIGTERM, previous)
    # orbax's writer threads finished inside the save: the group is whole, and no write goes on after the interrupt.
    restored = ocp.StandardCheckpointer().restore((tmp_path / "params" / "layers_0").absolute())
    assert sorted(restored) == sorted(group) and all((restored[k] == group[k]).all() for k in group)


def test_sigterm_during_convert_exits_cleanly_and_leaves_nothing(smollm2_gguf, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxlora", "convert", str(smollm2_gguf), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*/params")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "convert ended before the test could interrupt it"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_finetune_resumes_past_an_interrupted_first_save(tiny_with_tokenizer, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Row {i} of the data."}) for i in range(8)) + "\n")
    run = tmp_path / "run"
    common = ["finetune", tiny_with_tokenizer / "jax", "--data", data, "--out", run, "--seq-len", "16"]
    common += ["--batch-size", "2", "--steps", "2", "--save-every", "1"]

    def finetune(*flags):
        return subprocess.run(
            [sys.executable, "-m", "jaxlora", *map(str, common + list(flags))], capture_output=True, text=True
        )

    nothing = finetune("--resume")
    assert nothing.returncode == 1 and "nothing to resume" in nothing.stderr
    # A run killed inside its first save: only orbax's temporary folder of step 1.
    (run / "checkpoints" / "1.orbax-checkpoint-tmp-1234567890").mkdir(parents=True)
    (run / "checkpoints" / "1.orbax-checkpoint-tmp-1234567890" / "partial").write_text("torn")
    resumed = finetune("--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "starting from step 0" in resumed.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
    assert (run / "final" / "lora_config.json").is_file()
    # Run again without --resume: the run has checkpoints now, so it refuses rather than start over.
    again = finetune()
    assert again.returncode == 1 and "already has checkpoints" in again.stderr
