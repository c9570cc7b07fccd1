"""The command line's user errors: one line on stderr, exit code 2, no traceback; --data .pt files
load with torch.load(weights_only=True) unless --trust-data."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from neural_mechanics import cli, data_sources
from neural_mechanics.errors import InvalidArgumentError, ShapeError


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of ``neural-mechanics argv`` run in this process."""
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("neural-mechanics: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])


def _tensors(tmp_path, name="d.pt", n=40, labels=None, x=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g) if x is None else x
    y = torch.randint(0, 3, (n,), generator=g) if labels is None else labels
    path = tmp_path / name
    torch.save((x, y), path)
    return path


@pytest.mark.parametrize(
    "argv,fragments",
    [
        (["demo", "--steps", "1"], ["--steps", "got 1"]),
        (["demo", "--steps", "abc"], ["--steps", "integer"]),
        (["demo", "--threads", "-1"], ["--threads", "got -1"]),
        (["demo", "--threads", "0"], ["--threads"]),
        (["demo", "--image-size", "0"], ["--image-size", "got 0"]),
        (["demo", "--image-size", "100000"], ["--image-size"]),
        (["demo", "--image-size", "16"], ["--image-size applies to --data"]),
        (["demo", "--no-such-option"], ["unrecognized"]),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
    ],
)
def test_bad_options_are_one_line_and_exit_2(capsys, argv, fragments):
    code, err = run_cli(capsys, *argv)
    assert_user_error(code, err, *fragments)


def test_bad_data_is_one_line_and_exit_2(capsys, tmp_path):
    cases = {}
    cases["missing"] = ([str(tmp_path / "nowhere")], ["no such file or folder"])
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    cases["no class folders"] = ([str(empty)], ["cannot read the image folder"])
    bad_images = tmp_path / "bad-images" / "cat"
    bad_images.mkdir(parents=True)
    (bad_images / "one.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cases["bad image"] = ([str(tmp_path / "bad-images")], ["one.png", "cannot read this image"])
    no_tensors = tmp_path / "dict.pt"
    torch.save({"weights": 1}, no_tensors)
    cases["no tensors"] = ([str(no_tensors)], ["expected a torch dataset"])
    cases["huge labels"] = ([str(_tensors(tmp_path, "huge.pt", labels=torch.full((40,), 10**9)))], ["labels", "1e+09", "65536"])
    cases["negative labels"] = ([str(_tensors(tmp_path, "neg.pt", labels=torch.full((40,), -1)))], ["labels"])
    cases["fractional labels"] = ([str(_tensors(tmp_path, "frac.pt", labels=torch.full((40,), 0.5)))], ["whole numbers"])
    cases["length mismatch"] = ([str(_tensors(tmp_path, "len.pt", labels=torch.zeros(39, dtype=torch.int64)))], ["39", "40"])
    cases["nan inputs"] = ([str(_tensors(tmp_path, "nan.pt", x=torch.full((40, 1, 8, 8), float("nan"))))], ["nan"])
    cases["3-d inputs"] = ([str(_tensors(tmp_path, "3d.pt", x=torch.zeros(40, 8, 8)))], ["(n, channels, size, size)"])
    cases["tiny images"] = ([str(_tensors(tmp_path, "tiny.pt", x=torch.zeros(40, 1, 2, 2)))], ["too small"])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    cases["not a torch file"] = ([str(garbage)], ["not a readable torch file"])
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    cases["wrong kind of file"] = ([str(other)], ["expected 'digits'"])
    for what, (data, fragments) in cases.items():
        start = time.perf_counter()
        code, err = run_cli(capsys, "demo", "--out", str(tmp_path / "out"), "--no-progress", "--data", *data)
        assert_user_error(code, err, *fragments)
        assert time.perf_counter() - start < 30, what  # refused before any training
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_folder(capsys, tmp_path):
    folder = tmp_path / "locked"
    (folder / "cat").mkdir(parents=True)
    folder.chmod(0)
    try:
        code, err = run_cli(capsys, "demo", "--data", str(folder))
    finally:
        folder.chmod(0o755)
    assert_user_error(code, err, "not readable")


def test_bad_run_files_for_report(capsys, tmp_path):
    bogus = tmp_path / "bogus.nmrun"
    bogus.write_text("not a run")
    code, err = run_cli(capsys, "report", str(bogus), "--out", str(tmp_path / "r"))
    assert_user_error(code, err, "not a neural-mechanics run file")
    code, err = run_cli(capsys, "report", str(tmp_path / "missing.nmrun"), "--out", str(tmp_path / "r"))
    assert_user_error(code, err, "missing.nmrun")


def test_pickles_that_need_code_load_only_with_trust(tmp_path, capsys):
    """A .pt of tensors loads as it is; a pickled Dataset object needs --trust-data (its
    unpickling could run code), and --help says why."""
    plain = _tensors(tmp_path)
    assert data_sources.load(str(plain)).num_classes == 3
    x, y = torch.load(plain, weights_only=True)
    pickled = tmp_path / "dataset.pt"
    torch.save(torch.utils.data.TensorDataset(x, y), pickled)
    with pytest.raises(InvalidArgumentError, match="--trust-data"):
        data_sources.load(str(pickled))
    code, err = run_cli(capsys, "demo", "--data", str(pickled))
    assert_user_error(code, err, "--trust-data", "run code")
    source = data_sources.load(str(pickled), trust=True)
    assert source.num_classes == 3 and len(source.train) == 32
    assert cli.main(["demo", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trust-data" in help_text and "runs code" in help_text


def test_the_python_entry_points_check_too(tmp_path):
    with pytest.raises(InvalidArgumentError, match="image_size"):
        cli.demo(tmp_path / "out", steps=2, image_size=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="steps"):
        cli.demo(tmp_path / "out", steps=2.5, progress=False)
    with pytest.raises(InvalidArgumentError, match="labels"):
        data_sources.from_dataset((torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 10**9])))
    with pytest.raises(ShapeError, match="labels"):
        data_sources.from_dataset((torch.zeros(4, 1, 8, 8), torch.zeros(5, dtype=torch.int64)))
    with pytest.raises(InvalidArgumentError, match="num_classes"):
        data_sources.from_dataset((torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)), num_classes=10**9)
    with pytest.raises(InvalidArgumentError):
        data_sources.from_dataset({"a": 1})
    with pytest.raises(InvalidArgumentError):
        data_sources.image_folder(tmp_path / "nowhere")

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise RuntimeError("disk on fire")

    with pytest.raises(InvalidArgumentError, match="disk on fire"):
        data_sources.from_dataset(Broken())
    assert np.isclose(data_sources.from_dataset((torch.zeros(4, 1, 8, 8), torch.tensor([0.0, 1.0, 2.0, 1.0]))).num_classes, 3)


def test_a_real_process_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "neural_mechanics", "demo", "--steps", "1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert_user_error(proc.returncode, proc.stderr, "--steps")
    assert proc.stdout == ""
