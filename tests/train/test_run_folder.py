"""The run folder and the command line's errors, where a user meets them: `fdet train` in a
subprocess never overwrites a run, resumes past a damaged checkpoint, finds an unwritable folder
and data that cannot make a batch before any work, and reports every user error in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from fdet import build, specs
from fdet.cli import main
from fdet.train import TrainingError, load_run, train
from fdet.train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fdet.train.engine import checkpoints
from fdet.train.run_dir import resolve_checkpoint, resume_checkpoint

from .test_engine import assert_same_training_state, gn_experiment


def fdet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed command, as a user runs it (with this process's number of threads, so
    that a run it makes sums alike)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("FDET_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "fdet", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def error_lines(stderr: str, command: str = "train") -> list[str]:
    """The error lines of ``stderr``; no traceback may come with them."""
    assert "Traceback" not in stderr, stderr
    return [x for x in stderr.splitlines() if x.startswith(f"fdet {command}: error:")]


def files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def spec_file(path: Path, exp: specs.Experiment) -> Path:
    path.write_text(specs.to_json(exp))
    return path


# --- an existing run folder -----------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_then_replaced_only_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = gn_experiment(tmp_path / "cache", iterations=4, checkpoint_interval=2)
    run = tmp_path / "run"
    train(old, run, progress=False, final_eval=False)
    before = files(run)
    assert "checkpoints/iter_00000004.pt" in before
    new = spec_file(tmp_path / "new.json", gn_experiment(tmp_path / "cache", iterations=2))

    refused = fdet("train", new, "--out", run, "--no-progress")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr  # the error alone
    [line] = error_lines(refused.stderr)
    assert f"the folder {run} holds a run already (checkpoints up to iteration 4)" in line
    assert f"fdet train --resume {run}" in line and "--overwrite" in line
    assert files(run) == before  # nothing written, nothing deleted

    with pytest.raises(TrainingError, match="holds a run already"):
        train(specs.load(new), run, progress=False)
    with pytest.raises(TrainingError, match="exclude each other"):
        train(specs.load(new), run, progress=False, resume=True, overwrite=True)
    assert files(run) == before

    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["train", str(new), "--out", str(run), "--overwrite", "--no-progress"]) == 0
    assert "overwrite: deleted the previous run" in capsys.readouterr().err
    assert [i for i, _ in checkpoints(run)] == [2]  # the old run's iteration 4 is gone
    assert specs.load(run / "spec.json") == specs.load(new)
    assert (run / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert resolve_checkpoint(run) == run / "checkpoints" / "iter_00000002.pt"
    assert load_run(run)[0] == specs.load(new)
    # every file of the run follows the umask, checkpoints too (not mkstemp's 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        path = atomic_save({"model": {}, "spec": "{}"}, tmp_path / "c.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640


# --- resuming -------------------------------------------------------------------------------------


def test_resume_passes_over_a_truncated_checkpoint_and_removes_stale_temp_files(
    tmp_path: Path,
) -> None:
    exp = gn_experiment(
        tmp_path / "cache",
        iterations=5,
        checkpoint_interval=1,
        keep_checkpoints=3,
        optimizer=specs.SGD(lr=0.01, momentum=0.9),
    )
    run = tmp_path / "run"
    train(exp, run, progress=False, final_eval=False, stop_after=4)
    assert [i for i, _ in checkpoints(run)] == [2, 3, 4]
    newest = run / "checkpoints" / "iter_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # cut short
    # what a save killed by SIGKILL leaves
    stale = run / "checkpoints" / ".iter_00000005.pt.1a2b3c4d.tmp"
    stale.write_bytes(b"partial")

    resumed = fdet("train", "--resume", run, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    err = resumed.stderr
    assert "Traceback" not in err
    assert f"warning: {newest}: truncated or damaged" in err
    assert "renamed to iter_00000004.pt.bad" in err
    assert "removed 1 temporary file(s) left by an interrupted write" in err
    assert f"resuming {run} at iteration 3 of 5" in err
    assert not stale.exists() and (run / "checkpoints" / "iter_00000004.pt.bad").is_file()
    logged = [
        json.loads(x)["iteration"]
        for x in (run / "log.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert logged == [2, 4, 5]  # the records after iteration 3 were not kept twice

    straight = train(exp, tmp_path / "straight", progress=False, final_eval=False)
    assert_same_training_state(
        load_checkpoint(straight.checkpoint), load_checkpoint(checkpoints(run)[-1][1])
    )


class Payload:
    """Unpickling this calls ``open(marker, "w")``, which creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_bad_checkpoints_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = gn_experiment(tmp_path / "cache", iterations=2, checkpoint_interval=1)
    run = tmp_path / "run"
    train(exp, run, progress=False, final_eval=False)
    good = load_checkpoint(run / "checkpoints" / "iter_00000002.pt")
    marker = tmp_path / "payload-ran"

    bad = tmp_path / "bad"
    bad.mkdir()
    whole = (run / "checkpoints" / "iter_00000002.pt").read_bytes()
    (bad / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (bad / "random.pt").write_bytes(bytes(range(256)) * 16)
    torch.save({"weights": torch.ones(1)}, bad / "foreign.pt")
    torch.save({**good, "extra": Payload(marker)}, bad / "payload.pt")
    narrower = attrs.evolve(exp.model, backbone=attrs.evolve(exp.model.backbone, width=8))
    torch.save({**good, "model": build(narrower).state_dict()}, bad / "misfit.pt")
    expected = {
        "truncated.pt": "truncated or damaged",
        "random.pt": "not a PyTorch checkpoint file",
        "foreign.pt": "not an fdet checkpoint",
        "payload.pt": "refused: it holds Python objects",
        "misfit.pt": "its weights do not fit the model of its spec",
    }
    for name, words in expected.items():
        with pytest.raises(CheckpointError) as caught:
            load_run(bad / name)
        message = str(caught.value)
        assert words in message and str(bad / name) in message, message
        assert "\n" not in message and "weights_only=False" not in message, message
    assert not marker.exists()  # the payload never ran
    proof = tmp_path / "proof"  # ... and would have, loaded without weights_only
    torch.save({"extra": Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()

    # through the command line: `fdet eval` of a checkpoint, `--resume` of a run whose only
    # checkpoint carries a payload
    assert main(["eval", str(bad / "payload.pt")]) == 2
    [line] = error_lines(capsys.readouterr().err, "eval")
    assert "refused" in line
    evil = tmp_path / "evil"
    (evil / "checkpoints").mkdir(parents=True)
    (evil / "spec.json").write_text(specs.to_json(exp))
    torch.save({**good, "extra": Payload(marker)}, evil / "checkpoints" / "iter_00000002.pt")
    resumed = fdet("train", "--resume", evil, "--no-progress")
    assert resumed.returncode == 2
    [line] = error_lines(resumed.stderr)
    assert "no usable checkpoint" in line and "refused: it holds Python objects" in line
    assert "weights_only=False" not in resumed.stderr
    assert not marker.exists()


def test_resume_passes_over_unusable_checkpoints_but_not_another_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = gn_experiment(tmp_path / "cache", iterations=2, checkpoint_interval=1)
    run = tmp_path / "run"
    train(exp, run, progress=False, final_eval=False)
    good = load_checkpoint(run / "checkpoints" / "iter_00000002.pt")
    folder = run / "checkpoints"
    torch.save({**good, "model": {"w": torch.ones(1)}, "iteration": 3}, folder / "iter_00000003.pt")
    (folder / "iter_00000004.pt").write_bytes(b"\0" * 100)
    warnings: list[str] = []
    path, ckpt = resume_checkpoint(run, exp, warn=warnings.append)
    assert path.name == "iter_00000002.pt" and ckpt["iteration"] == 2
    assert len(warnings) == 2
    assert "iter_00000004.pt: not a PyTorch checkpoint file" in warnings[0]
    assert "iter_00000003.pt: its weights do not fit its spec" in warnings[1]
    # a readable checkpoint of another experiment is not passed over (nor renamed)
    other = gn_experiment(tmp_path / "cache", iterations=3)
    with pytest.raises(TrainingError, match="trained with another spec"):
        resume_checkpoint(run, other)
    assert (folder / "iter_00000002.pt").is_file()
    # a folder whose spec.json is not its checkpoints' says so, rather than "resume it"
    (run / "spec.json").write_text(specs.to_json(other))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{run} mixes two runs" in line and "--overwrite" in line and "--resume" not in line


# --- checks before any work -----------------------------------------------------------------------


def test_an_unwritable_run_folder_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    spec = spec_file(tmp_path / "exp.json", gn_experiment(cache))
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = fdet("train", spec, "--out", a_file / "run", "--no-progress")
    assert done.returncode == 2
    [line] = error_lines(done.stderr)
    assert f"cannot make the run folder {a_file / 'run'}: {a_file} is a file" in line
    assert not cache.exists()  # no data was generated
    assert main(["train", str(spec), "--out", str(a_file), "--no-progress"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"the run folder {a_file} is a file, not a folder" in line

    # A folder that refuses writes (permission bits, a read-only mount, a full disk). Tests
    # run as root, where permission bits do not stop a write, so the refusal is simulated at
    # the system call: making a file in a folder of `refused` fails as it would for a user.
    refused: set[Path] = set()
    real_open = os.open

    def refusing_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_CREAT and Path(str(path)).parent in refused:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    def no_work(*args: object, **kw: object) -> None:
        raise AssertionError("data made before the run folder was found unwritable")

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr("fdet.train.engine.make_datasets", no_work)
    locked = tmp_path / "locked"
    locked.mkdir()
    refused.add(locked)
    with pytest.raises(TrainingError, match=rf"cannot write in {locked} \(Permission denied\)"):
        train(gn_experiment(cache), locked, progress=False)
    # a run to resume whose checkpoints/ refuses writes
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "spec.json").write_text(specs.to_json(gn_experiment(cache)))
    refused.add(run / "checkpoints")
    with pytest.raises(TrainingError, match=rf"cannot write in {run / 'checkpoints'} "):
        train(gn_experiment(cache), run, progress=False, resume=True)
    assert not cache.exists()


def test_data_that_cannot_make_a_batch_and_a_missing_device_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = gn_experiment(tmp_path / "cache")  # 24 training images
    spec = spec_file(tmp_path / "exp.json", exp)
    run = tmp_path / "run"
    done = fdet("train", spec, "--out", run, "--set", "batch_size=32", "--no-progress")
    assert done.returncode == 2
    [line] = error_lines(done.stderr)
    assert "batch_size 32 is larger than the training set" in line and "24 images" in line
    assert not run.exists()  # checked before the run folder is made

    # an empty training set
    from fdet.data.shapes import ensure_shapes

    assert isinstance(exp.data, specs.ShapesData)
    paths = ensure_shapes(exp.data)
    empty = json.loads(paths.train_annotations.read_text())
    empty.update(images=[], annotations=[])
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    coco = specs.CocoData(
        train_images=str(paths.train_images),
        train_annotations=str(tmp_path / "empty.json"),
        val_images=str(paths.val_images),
        val_annotations=str(paths.val_annotations),
    )
    empty_spec = spec_file(tmp_path / "empty-exp.json", attrs.evolve(exp, data=coco))
    capsys.readouterr()
    assert main(["train", str(empty_spec), "--out", str(run), "--no-progress"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "the training set" in line and "has no images" in line
    assert not run.exists()

    if not torch.cuda.is_available():
        assert main(["train", str(spec), "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
        [line] = error_lines(capsys.readouterr().err)
        assert "device 'cuda': no CUDA GPU is visible" in line
        assert not (tmp_path / "gpu").exists()
        checkpoint = atomic_save({"model": {}, "spec": specs.to_json(exp)}, tmp_path / "c.pt")
        assert main(["eval", str(checkpoint), "--device", "cuda"]) == 2
        [line] = error_lines(capsys.readouterr().err, "eval")
        assert "device 'cuda'" in line and "checkpoint" not in line  # not blamed on the file


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = spec_file(tmp_path / "exp.json", gn_experiment(tmp_path / "cache"))
    args = ["train", str(spec), "--out", str(spec)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1
    for argv in (["--debug", *args], [*args, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "TrainingError" in err
        assert err.rstrip().splitlines()[-1].startswith("fdet train: error: the run folder")
