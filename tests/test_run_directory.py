"""A run touches only what it wrote, and one process writes one directory (train and compare, as typed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablelora.cli import main
from stablelora.fileio import OWNER_FILE, claimed_directory

CONFIG = "configs/minilm_privacyqa.yaml"


def _holder(directory: Path) -> subprocess.Popen:
    """Another process that holds ``directory`` as a run would, until it is killed."""
    code = ("import sys, time; from pathlib import Path; from stablelora.fileio import claimed_directory\n"
            "with claimed_directory(Path(sys.argv[1]), 'run directory', only_ours=False):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_new_run_in_a_directory_of_user_files_deletes_nothing(tmp_path, capsys):
    """The repro: a run that fails to load its data used to delete config.yaml, tb/ and adapter/ first."""
    d = tmp_path / "d"
    for name in ("config.yaml", "tb/notes", "adapter/w.bin", "eval_before.json"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text("mine")
    assert main(["train", CONFIG, "data.dataset=jsonl", "data.train_file=README.md", "data.eval_file=README.md",
                 "--output-dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert f"The run directory {d} is not empty (adapter, config.yaml, eval_before.json, tb)" in err
    assert "was not made by stablelora" in err and "nothing in it was touched" in err
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == \
        ["adapter", "adapter/w.bin", "config.yaml", "eval_before.json", "tb", "tb/notes"]
    assert all((d / n).read_text() == "mine" for n in ("config.yaml", "tb/notes", "adapter/w.bin"))


def test_a_home_directory_is_refused_and_kept(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    (home / ".bashrc").parent.mkdir()
    (home / ".bashrc").write_text("mine")
    assert main(["train", CONFIG, "--output-dir", str(home)]) == 2
    assert "is not empty (.bashrc)" in capsys.readouterr().err
    assert (home / ".bashrc").read_text() == "mine" and not (home / OWNER_FILE).exists()


def test_a_second_train_in_a_directory_in_use_is_refused_with_the_holders_pid(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        assert main(["train", CONFIG, "--output-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"The run directory {run} is in use by another stablelora process (pid {holder.pid})" in err
        assert sorted(p.name for p in run.iterdir()) == [OWNER_FILE]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # a killed holder leaves no lock behind: the next process gets the directory
    with claimed_directory(run, "run directory", only_ours=True):
        assert (run / OWNER_FILE).read_text().strip() == str(os.getpid())


def test_a_second_compare_in_a_directory_in_use_is_refused_with_the_holders_pid(tmp_path, capsys):
    from test_compare import _compare

    config = _compare(tmp_path)
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        assert main(["compare", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"The compare directory {out} is in use by another stablelora process (pid {holder.pid})" in err
        assert sorted(p.name for p in out.iterdir()) == [OWNER_FILE]  # no run was started or deleted
    finally:
        holder.kill()
        holder.wait()


def test_compare_never_deletes_a_run_directory_it_did_not_make(tmp_path):
    from stablelora.benchmark.grid import CompareError, load_compare_config, plan
    from stablelora.benchmark.runner import execute
    from test_compare import _compare

    cfg = load_compare_config(_compare(tmp_path))
    run = plan(cfg, {})[0]
    foreign = cfg.runs_dir / run.run_id
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CompareError, match="holds files that compare did not write"):
        execute(cfg, run)
    assert (foreign / "notes.txt").read_text() == "mine"
