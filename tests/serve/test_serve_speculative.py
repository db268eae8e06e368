"""Self-speculative decoding in the engine: lossless (greedy == full depth), the sampled acceptance rule,
drafts that are really accepted on an early-exit-trained model."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import early_exit_trained, load, random_prompts, successor_chain

from rrt_ray.convert import convert_checkpoint
from rrt_ray.serve import Engine, EngineConfig, SamplingParams
from rrt_ray.serve.sampling import token_probs
from rrt_ray.serve.speculative import accept_sampled, next_draft_length
from rrt_ray.testing import tiny_model

FAMILIES = ["llama", "gemma", "gpt_neox", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A 2-loop rank-8 conversion of each family's tiny random model."""
    root = tmp_path_factory.mktemp("spec-models")
    dirs = {}
    for family in FAMILIES:
        tiny_model(family, num_layers=4).save_pretrained(root / family)
        convert_checkpoint(str(root / family), str(root / f"{family}-rec"), loops=2, lora_rank=8, progress=False)
        dirs[family] = root / f"{family}-rec"
    return dirs


def _greedy(engine, prompts, max_tokens, **params):
    outs = engine.generate(prompts, [SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params) for _ in prompts])
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_equals_full_depth_greedy(family_dirs, family):
    prompts = random_prompts([5, 17, 2], seed=21)
    # mistral: 40 + 30 tokens cross its 64-token sliding window
    prompts.append(random_prompts([40], seed=22)[0])
    model = load(family_dirs[family])
    full = _greedy(Engine(model, config=EngineConfig(max_batch_tokens=32)), prompts, 30, exit_mode="none")
    for k, schedule in [(1, "constant"), (3, "constant"), (3, "heuristic")]:
        engine = Engine(model, config=EngineConfig(max_batch_tokens=32, draft_schedule=schedule))
        spec = _greedy(engine, prompts, 30, exit_mode="speculative", draft_tokens=k)
        for f, s in zip(full, spec):
            assert s.token_ids == f.token_ids
            torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(f.logprobs), rtol=0, atol=1e-4)
        assert sum(o.drafted for o in spec) > 0 and engine.stats["drafted_tokens"] == sum(o.drafted for o in spec)


def test_mixed_modes_in_one_batch_equal_each_alone(model_dirs):
    """Speculative, confidence and full-depth requests share steps; each gets what it gets alone."""
    model = load(model_dirs[3])
    prompts = random_prompts([6, 19, 3, 11, 8], seed=23)
    modes = [
        dict(exit_mode="speculative", draft_tokens=2),
        dict(exit_mode="confidence", exit_threshold=0.02),
        dict(exit_mode="none"),
        dict(exit_mode="speculative", draft_tokens=4),
        dict(exit_mode="confidence", exit_threshold=0.0),
    ]
    params = [SamplingParams(max_tokens=14, ignore_eos=True, **m) for m in modes]
    engine = Engine(model, config=EngineConfig(max_batch_tokens=16))
    together = engine.generate(prompts, params)
    assert engine.stats["mixed_depth_steps"] > 5 and engine.stats["drafted_tokens"] > 0
    full = Engine(model).generate(prompts, SamplingParams(max_tokens=14, ignore_eos=True, exit_mode="none"))
    for prompt, p, out, reference in zip(prompts, params, together, full):
        alone = Engine(model).generate([prompt], p)[0]
        assert out.token_ids == alone.token_ids and out.exit_loops == alone.exit_loops
        if p.exit_mode != "confidence":
            assert out.token_ids == reference.token_ids  # lossless
    assert any(1 in o.exit_loops for o in together[1::3])  # the confidence requests did exit early


def test_sampled_acceptance_rule_gives_the_target_distribution_exactly():
    """For one drafted token: P(emit x) = q(x) min(1, p(x)/q(x)) + P(reject) residual(x) = p(x).
    Measured by enumerating the draft and integrating the acceptance draw over a fine grid of u."""
    torch.manual_seed(0)
    vocab = 6
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
    target_logits = torch.randn(1, vocab) * 2
    p = token_probs(target_logits[0], params)
    q = torch.softmax(torch.randn(vocab), -1)
    emitted = torch.zeros(vocab, dtype=torch.float64)
    for draft in range(vocab):
        generator = torch.Generator().manual_seed(draft)
        for _ in range(400):
            kept, tokens = accept_sampled([draft], [q], target_logits, params, generator)
            emitted[tokens[0]] += float(q[draft]) / 400
    torch.testing.assert_close(emitted, p.double(), rtol=0, atol=0.03)
    assert float(p.min()) == 0.0 and emitted[p == 0].sum() == 0  # top-p's cut tokens are never emitted


def _chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


def _buckets(p: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """The k most likely tokens and their probabilities, plus the rest as one bucket."""
    top = torch.topk(p, k).indices.tolist()
    probs = [float(p[t]) for t in top]
    return top, probs + [1.0 - sum(probs)]


def _counts(tokens: list[int], top: list[int]) -> list[int]:
    counts = [tokens.count(t) for t in top]
    return counts + [len(tokens) - sum(counts)]


def test_sampled_speculative_matches_full_depth_sampling_in_distribution(model_dirs):
    """Chi-square against the exact full-depth distribution. The first token comes from the prompt at full
    depth; the second is drafted by loop 1 and accepted or resampled, so it tests the acceptance rule: the
    head is scaled so that loop 1's distribution is far from full depth's (total variation ~0.5)."""
    model = load(model_dirs[2])
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    prompt = random_prompts([5], seed=24)[0]
    n = 400
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, ignore_eos=True, exit_mode="speculative", draft_tokens=2) for s in range(n)]
    engine = Engine(model, config=EngineConfig(max_num_seqs=64, max_batch_tokens=512))
    outs = [o.token_ids for o in engine.generate([prompt] * n, params)]
    assert engine.stats["drafted_tokens"] == n and 0 < engine.stats["accepted_drafts"] < n
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        top1, probs1 = _buckets(p1, 4)
        first = top1[0]
        p2 = torch.softmax(model(torch.tensor([prompt + [first]])).logits[0, -1].float(), -1)
        top2, probs2 = _buckets(p2, 4)
    assert _chi_square(_counts([o[0] for o in outs], top1), probs1) < 18.5  # 4 dof, p = 0.001
    seconds = [o[1] for o in outs if o[0] == first]
    assert len(seconds) > 100
    assert _chi_square(_counts(seconds, top2), probs2) < 18.5


@pytest.fixture(scope="module")
def early_exit_student(family_dirs):
    return early_exit_trained(family_dirs["llama"], steps=60)


def test_speculative_mode_really_drafts_on_an_early_exit_trained_model(early_exit_student):
    """Loop-1 drafts that full depth accepts: each request reports accepted drafts, and the same greedy
    output takes fewer engine steps than full depth (one request at a time, as a concurrency-1 client)."""
    model, successor = early_exit_student
    prompts = [successor_chain(successor, start, 5) for start in (5, 50, 100, 150)]
    steps, outputs = {}, {}  # per mode
    for mode in ("none", "speculative"):
        engine = Engine(model, config=EngineConfig(max_num_seqs=1))  # one request at a time
        params = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0, exit_mode=mode, draft_tokens=4)
        outputs[mode] = engine.generate(prompts, params)
        steps[mode] = engine.stats["steps"]
    for full, spec in zip(outputs["none"], outputs["speculative"]):
        assert spec.token_ids == full.token_ids
        assert spec.accepted > 0 and spec.drafted >= spec.accepted
    assert steps["speculative"] < steps["none"], steps


def test_heuristic_schedule_drafts_less_where_drafts_are_rejected(family_dirs):
    """A loop-1 exit that rarely agrees with full depth (SmolLM2 before early-exit training: 1% of drafts
    kept): 4 drafts a round then cost ~5 steps per token. The heuristic schedule falls to 1 draft a round:
    same tokens, far fewer drafts and steps."""
    model = load(family_dirs["llama"])
    with torch.no_grad():  # louder layer outputs: loop 2 overturns loop 1's prediction (a random model's rarely does)
        for name, param in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                param.mul_(10.0)
    prompts = random_prompts([5, 12, 8], seed=31)
    runs = {}
    for schedule in ("constant", "heuristic"):
        engine = Engine(model, config=EngineConfig(max_batch_tokens=32, draft_schedule=schedule))
        runs[schedule] = (_greedy(engine, prompts, 40, exit_mode="speculative", draft_tokens=4), dict(engine.stats))
    (constant, c_stats), (heuristic, h_stats) = runs["constant"], runs["heuristic"]
    assert [o.token_ids for o in heuristic] == [o.token_ids for o in constant]
    kept = c_stats["accepted_drafts"] / c_stats["drafted_tokens"]
    assert kept < 0.1, f"this test needs a student whose drafts are mostly rejected; kept {kept:.0%}"
    assert h_stats["drafted_tokens"] < 0.5 * c_stats["drafted_tokens"]
    assert h_stats["steps"] < 0.6 * c_stats["steps"]


def test_next_draft_length_follows_the_schedule():
    assert next_draft_length("constant", 1, drafted=1, kept=0, limit=4) == 4
    assert next_draft_length("heuristic", 4, drafted=4, kept=3, limit=4) == 3
    assert next_draft_length("heuristic", 1, drafted=1, kept=0, limit=4) == 1  # never below one draft
    assert next_draft_length("heuristic", 2, drafted=2, kept=2, limit=4) == 4  # +2 when all were kept
    assert next_draft_length("heuristic", 3, drafted=3, kept=3, limit=4) == 4  # capped at the request's draft_tokens


def test_an_unknown_draft_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown draft_schedule 'greedy'; allowed: constant, heuristic"):
        EngineConfig(draft_schedule="greedy")
