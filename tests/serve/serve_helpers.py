"""Helpers shared by the serving tests: model loading, prompts, a forced exit rule, a word-level tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import rrt_ray  # noqa: F401
from rrt_ray.serve.engine import ExitPolicy, RequestState
from rrt_ray.testing import VOCAB


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


class ScheduledExit(ExitPolicy):
    """Forces generated token i of request r to exit after schedule[r][i] loops (an oracle exit rule)."""

    def __init__(self, schedule: dict[str, list[int]]) -> None:
        self.schedule = schedule

    def needs_confidence(self, request: RequestState, loops_done: int) -> bool:
        return True

    def should_exit(self, request: RequestState, loops_done: int, confidence: float) -> bool:
        return loops_done >= self.schedule[request.request_id][len(request.output_ids)]


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: token i <-> "w{i}" (ids 0, 1, 2 are pad, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"


def save_word_tokenizer(directory, chat: bool = True) -> None:
    """Save the word tokenizer (optionally with a chat template over its words) next to a model."""
    tokenizer = word_tokenizer()
    vocab = tokenizer.get_vocab()
    for word in ("system", "user", "assistant", "developer"):
        assert word not in vocab  # template words become <pad>: harmless for random models
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    import time

    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer in {timeout_s} s")


def parse_sse(response) -> list:
    """The JSON events of a server-sent-events response, up to (not including) [DONE]; asserts [DONE] came."""
    import json

    events, done = [], False
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    assert done, "stream ended without [DONE]"
    return events


def metric_value(text: str, name: str) -> float:
    """The value of one sample (`name` with its labels, as printed) in Prometheus text; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def successor_chain(successor: torch.Tensor, start: int, length: int) -> list[int]:
    """start, successor(start), ...: the synthetic text the early-exit stand-in is trained on."""
    out = [start]
    for _ in range(length - 1):
        out.append(int(successor[out[-1] - 3]))
    return out


def early_exit_trained(model_dir, steps: int = 60, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """A cycle recursive model uptrained with the early-exit loss (the paper's aggressive weighting plus
    self-distillation from the final exit, as jobs/configs/demo_early_exit.yaml) on a synthetic successor
    chain (each token has one fixed next token), where loop 1 learns what full depth predicts: the demo
    student's property (loop-1 exits that agree with full depth) in seconds. All weights train: with the
    backbone frozen a random tiny model has nothing loop 1 could agree on. Returns (model, successor)."""
    from rrt_ray.models.early_exit import early_exit_loss, loop_exit_logits

    generator = torch.Generator().manual_seed(seed)
    successor = torch.arange(3, VOCAB)[torch.randperm(VOCAB - 3, generator=generator)]  # next of token 3 + i
    model = load(model_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(3, VOCAB, (16,), generator=generator).tolist()
        batch = torch.tensor([successor_chain(successor, s, 33) for s in starts])  # (16, 33)
        loss, _ = early_exit_loss(loop_exit_logits(model, batch[:, :-1]), batch[:, 1:], schedule="aggressive", distill_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), successor
