"""Fixtures for the training tests: a tiny teacher trained-tokenizer Llama, its converted student, a local
Ray cluster, a config builder with small, fast settings, and a run whose training worker is killed mid-way."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from polling import wait_for

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

TINY_VOCAB = 512
CORPUS_BYTES = 200_000


def _weights(model_dir: str):
    from safetensors.torch import load_file

    return {k: v for file in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.fixture(scope="session")
def weights():
    """weights(model_dir) -> {name: tensor} of every safetensors file of a Hugging Face directory."""
    return _weights


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """An 8-layer random Llama (hidden 64) with a BPE tokenizer trained on a slice of the default corpus."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rrt_ray import data

    out = tmp_path_factory.mktemp("teacher")
    tokenizer = data.train_bpe_tokenizer(data.load_texts("default", "train", CORPUS_BYTES), TINY_VOCAB)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_student(tiny_teacher, tmp_path_factory) -> str:
    """The teacher converted to 4 shared layers looped twice, LoRA rank 8 (SVD init)."""
    from rrt_ray.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("student") / "converted"
    convert_checkpoint(tiny_teacher, str(out), loops=2, sharing="cycle", init="average", lora_rank=8, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """A local 2-CPU cluster. Its workers carry moto's dummy S3 keys (the S3 tests' server accepts any):
    training never forwards credentials to workers, they come from the workers' own environment."""
    import ray

    started = not ray.is_initialized()
    if started:
        dummy_keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": dummy_keys})
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def make_config(tmp_path, tiny_teacher, tiny_student):
    """TrainConfig for a few-second run on the tiny models; keyword overrides as dotted keys."""
    from rrt_ray.train.config import TrainConfig

    cache = tmp_path.parent / "token-cache"  # shared by the tests of one session

    def build(*overrides: str) -> TrainConfig:
        base = [
            f"model.teacher={tiny_teacher}",
            f"model.student={tiny_student}",
            "data.source=default",
            f"data.max_bytes={CORPUS_BYTES}",
            "data.seq_len=32",
            "data.micro_batch_size=4",
            "data.eval_batches=2",
            f"data.cache_dir={cache}",
            "optim.lr=3e-3",
            "optim.warmup_steps=1",
            "optim.max_steps=4",
            "kd.weight=0.5",
            "run.num_workers=2",
            f"run.storage={tmp_path / 'runs'}",
            f"run.output={tmp_path / 'out'}",
            f"run.workdir={tmp_path / 'work'}",
            "run.checkpoint_every=2",
            "run.log_every=1",
            "run.eval_every=2",
        ]
        return TrainConfig.load(None, base + list(overrides))

    return build


def _train_workers() -> list:
    """Ray Train worker processes of the local cluster this test process started."""
    import psutil

    workers = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                workers.append(proc)
        except psutil.Error:
            continue
    return workers


@pytest.fixture
def fit_killing_a_worker():
    """fit_killing_a_worker(cfg, after_step) -> metrics: `fit(cfg)` with one training worker SIGKILLed as soon
    as the checkpoint of after_step (or a later one) is published; the run must restart and finish."""
    from rrt_ray.train.trainer import fit

    def run(cfg, after_step: int) -> dict:
        latest = Path(cfg.run.storage) / cfg.run.name / "latest"
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = fit(cfg)
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                box["error"] = err

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        wait_for(lambda: latest.is_file() and latest.read_text().strip() >= f"step_{after_step:08d}", 300,
                 f"the checkpoint of step {after_step}")
        victims = _train_workers()
        assert victims, "no RayTrainWorker process found"
        os.kill(victims[-1].pid, signal.SIGKILL)
        thread.join(timeout=600)
        assert not thread.is_alive(), "the killed run did not finish within 600 s"
        assert "error" not in box, box.get("error")
        assert box["result"]["resumed_from"] is not None and box["result"]["resumed_from"] >= after_step  # it restarted
        return box["result"]

    return run
