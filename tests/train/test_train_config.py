"""TrainConfig: YAML + dotted overrides, unknown keys, coercion, validation messages."""

from pathlib import Path

import pytest

from rrt_ray.train.config import TrainConfig, apply_override, valid_keys

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_defaults_round_trip_through_a_plain_dict():
    cfg = TrainConfig.load(None, ["model.teacher=t", "optim.lr=0.01", "zero.stage=1"])
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_overrides_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  teacher: t\noptim:\n  lr: 3e-4\n")  # PyYAML reads 3e-4 as a string
    cfg = TrainConfig.load(path, ["zero.stage=3", "optim.max_steps=20", "kd.loss=jsd", "model.lora_rank=full", "data.max_bytes=null"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.zero.stage == 3 and cfg.optim.max_steps == 20 and cfg.kd.loss == "jsd"
    assert cfg.model.lora_rank == "full" and cfg.data.max_bytes is None
    assert TrainConfig.load(path, ["model.lora_rank=8"]).model.lora_rank == 8


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        TrainConfig.load(None, ["model.teacher=t", "optim.learning_rate=1"])
    message = str(err.value)
    assert "'optim.learning_rate'" in message and "optim.lr, optim.min_lr_ratio" in message
    with pytest.raises(ValueError, match="unknown config key 'bogus'"):
        TrainConfig.from_dict({"bogus": {}})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("zero.stage=4", "zero.stage 4 is not one of 1, 2, 3"),
        ("model.loss_chunk_tokens=-4", "model.loss_chunk_tokens must be >= 0"),
        ("zero.precision=fp16", "zero.precision 'fp16' is not one of fp32, bf16"),
        ("kd.loss=kl", "kd.loss 'kl' is not one of forward_kl, reverse_kl, jsd"),
        ("kd.weight=1.5", "kd.weight must be in [0, 1], got 1.5"),
        ("optim.schedule=linear", "optim.schedule 'linear' is not one of cosine, wsd, constant"),
        ("optim.lr=abc", "optim.lr must be float, got 'abc'"),
        ("optim.warmup_steps=500", "optim.warmup_steps (500) must be < optim.max_steps (100)"),
        ("model.lora_rank=-1", "model.lora_rank must be an integer >= 0 or 'full', got -1"),
        ("run.num_workers=0", "run.num_workers must be >= 1, got 0"),
        ("run.mmap_threshold_mb=64", "run.mmap_threshold_mb must be in [0, 32] (MiB; 0: glibc's default), got 64"),
        ("run.trim_heap=maybe", "run.trim_heap must be bool"),
    ],
)
def test_validation_names_the_bad_value_and_what_is_allowed(override, fragment):
    with pytest.raises(ValueError) as err:
        TrainConfig.load(None, ["model.teacher=t", override])
    assert fragment in str(err.value)


def test_kd_needs_a_teacher_and_something_to_train():
    with pytest.raises(ValueError, match="set model.student"):
        TrainConfig.load(None, [])
    with pytest.raises(ValueError, match="kd.weight=0.5 needs model.teacher"):
        TrainConfig.load(None, ["model.student=s"])
    assert TrainConfig.load(None, ["model.student=s", "kd.weight=0"]).kd.enabled is False


def test_malformed_override():
    with pytest.raises(ValueError, match="not of the form"):
        apply_override({}, "optim.lr")


def test_valid_keys_are_dotted():
    keys = valid_keys()
    assert "optim.lr" in keys and "run.storage" in keys and "model" not in keys


@pytest.mark.parametrize("name", ["demo.yaml", "tinyllama.yaml"])
def test_shipped_configs_load(name):
    cfg = TrainConfig.load(CONFIGS / name)
    assert cfg.model.teacher
