"""Driver-side preflight: it accepts exactly the data sources `load_texts` reads, and names the bad one."""

from __future__ import annotations

import pytest

from rrt_ray import data
from rrt_ray.train.prepare import check_data_source, resolve_model


def test_preflight_accepts_a_glob_that_load_texts_reads(tmp_path):
    for i in range(60):
        (tmp_path / f"part{i:02d}.txt").write_text(f"document {i}\n")
    source = str(tmp_path / "part*.txt")
    assert len(data.load_texts(source, "all")) == 60
    check_data_source(source)  # used to fail: the glob itself is no existing path


@pytest.mark.parametrize("name", ["missing/*.txt", "no_such_dir/sub/corpus", "./absent.jsonl"])
def test_preflight_rejects_local_sources_that_name_nothing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="data.source: data source .* (does not exist|matches no files)"):
        check_data_source(name)
    with pytest.raises((ValueError, FileNotFoundError)):
        data.load_texts(name, "all")


def test_preflight_rejects_a_directory_without_data_files(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="is a directory without .txt/.jsonl/.parquet files"):
        check_data_source(str(tmp_path))


def test_hub_id_guess_is_the_converters(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("org/model", "model.teacher") == "org/model"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("./org/model", "model.teacher")


def test_model_calibrate_converts_the_teacher_calibrated_and_caches_it_apart(make_config, tmp_path):
    """model.calibrate=N is `rrt convert --calibrate N`: its own cached conversion, with N in the provenance."""
    import json
    from pathlib import Path

    from rrt_ray.train.prepare import convert_teacher

    converted = {}
    for n in (0, 2):
        cfg = make_config("model.student=", f"model.calibrate={n}", "model.lora_rank=4", f"run.workdir={tmp_path / 'work'}")
        out = convert_teacher(cfg, log=lambda line: None)
        converted[n] = json.loads((Path(out) / "config.json").read_text())["provenance"]["conversion"]["calibration"]
    assert converted[0]["sequences"] == 0 and converted[2]["sequences"] == 2, converted
    with pytest.raises(ValueError, match=r"model.calibrate must be >= 0.*got -1"):
        make_config("model.calibrate=-1")
