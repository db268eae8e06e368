"""The serving engine without Ray: equality with HF generate, depth-wise batching, KV filling, exits, sampling."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import ScheduledExit, load, random_prompts, word_tokenizer

from rrt_ray.serve import Engine, EngineConfig, ExitPolicy, SamplingParams
from rrt_ray.testing import tiny_model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------- early exit off == HF generate


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "gpt_neox"])
def test_plain_model_greedy_equals_hf_generate(family):
    reference = tiny_model(family)
    engine = Engine(tiny_model(family), config=EngineConfig(max_batch_tokens=24, max_num_seqs=3))
    # 70 + 20 tokens crosses Mistral's 64-token sliding window; a budget of 24 forces chunked prefill
    prompts = random_prompts([5, 70, 1, 13, 31])
    outs = engine.generate(prompts, SamplingParams(max_tokens=20))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(reference, prompt, 20)
        assert out.exit_loops == [1] * len(out.token_ids)


@pytest.mark.parametrize("name", [2, 3, "seq", "mid"])
def test_recursive_model_early_exit_off_equals_hf_generate(model_dirs, name):
    reference, model = load(model_dirs[name]), load(model_dirs[name])
    engine = Engine(model, config=EngineConfig(max_batch_tokens=16, max_num_seqs=4))
    prompts = random_prompts([4, 23, 1, 9, 40], seed=1)
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, exit_threshold=1.0))
    loops = 1 if name in ("seq", "mid") else name  # no loop boundary to exit at: one engine step
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(reference, prompt, 16)
        assert out.exit_loops == [loops] * len(out.token_ids)


def test_teacher_forced_scores_equal_hf_log_probs(model_dirs):
    reference, model = load(model_dirs[3]), load(model_dirs[3])
    prompt, continuation = random_prompts([7, 12], seed=2)
    engine = Engine(model)
    engine.add_request(prompt, SamplingParams(), request_id="score", teacher_ids=continuation)
    out = [o for o in _drain(engine) if o.finished][0]
    logits = reference(torch.tensor([prompt + continuation])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(continuation)[:, None])[:, 0]
    assert out.token_ids == continuation
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- depth-wise batching and KV filling


def _drain(engine):
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


SCHEDULES = {  # exit loop of each generated token, per request
    "a": [1, 3, 2, 1, 1, 2, 3, 3, 1, 2, 1, 1],
    "b": [3, 1, 1, 2, 3, 1, 2, 1, 3, 3, 2, 1],
    "c": [2, 2, 1, 3, 1, 1, 1, 2, 2, 3, 1, 3],
    "d": [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
}


@pytest.mark.parametrize("kv_fill", ["propagate", "share"])
def test_mixed_depths_in_one_batch_equal_one_request_at_a_time(model_dirs, kv_fill):
    prompts = dict(zip(SCHEDULES, random_prompts([6, 19, 2, 11], seed=3)))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batched = Engine(load(model_dirs[3]), config=EngineConfig(max_batch_tokens=10, kv_fill=kv_fill), exit_policy=ScheduledExit(SCHEDULES))
    for rid, prompt in prompts.items():
        batched.add_request(prompt, params, request_id=rid)
    together = {o.request_id: o for o in _drain(batched) if o.finished}
    assert batched.stats["mixed_depth_steps"] > 10  # tokens at different loops really shared layer calls

    model = load(model_dirs[3])
    for rid, prompt in prompts.items():
        alone = Engine(model, config=EngineConfig(max_batch_tokens=64, kv_fill=kv_fill), exit_policy=ScheduledExit(SCHEDULES))
        alone.add_request(prompt, params, request_id=rid)
        out = [o for o in _drain(alone) if o.finished][0]
        assert together[rid].exit_loops == SCHEDULES[rid] == out.exit_loops
        assert together[rid].token_ids == out.token_ids
        torch.testing.assert_close(torch.tensor(together[rid].logprobs), torch.tensor(out.logprobs), rtol=0, atol=1e-5)


def _reference_with_exits(model, tokens: list[int], exit_loops: list[int]):
    """Full-sequence HF forward in which token t's hidden state stops changing after exit_loops[t] loops.

    This is what CALM's state propagation defines: every skipped layer computes the exited token's keys
    and values from its frozen (exited) hidden state. Returns the logits and the HF cache (one slot per
    unrolled position).
    """
    unrolled = model.unrolled_layers
    frozen_after = torch.tensor(exit_loops)
    original_run = unrolled.run

    def run(position, hidden_states, *args, **kwargs):
        out = original_run(position, hidden_states, *args, **kwargs)
        skipped = (position.depth >= frozen_after)[None, :, None]  # (1, L, 1)
        return torch.where(skipped, hidden_states, out)

    unrolled.run = run
    try:
        with torch.no_grad():
            out = model(torch.tensor([tokens]), use_cache=True)
    finally:
        del unrolled.run
    return out.logits[0].float(), out.past_key_values


@pytest.mark.parametrize("kv_only_fill", [True, False], ids=["k_v_projections", "whole_attention_module"])
def test_kv_filled_by_propagation_equals_the_reference_computation(model_dirs, kv_only_fill):
    schedule = {"r": [1, 3, 1, 2, 1, 1, 3, 2, 1, 2]}
    prompt = random_prompts([6], seed=4)[0]
    engine = Engine(load(model_dirs[3]), exit_policy=ScheduledExit(schedule))
    engine.runner.kv_only_fill = kv_only_fill
    engine.pool.retain_released = True  # read the cache after the request finished
    engine.add_request(prompt, SamplingParams(max_tokens=10, ignore_eos=True), request_id="r")
    outs = engine.step()
    seq = engine.running["r"].seq
    outs += _drain(engine)
    out = [o for o in outs if o.finished][0]
    assert out.exit_loops == schedule["r"]

    tokens = prompt + out.token_ids[:-1]  # every token the model was fed
    exits = [3] * (len(prompt) - 1) + schedule["r"]  # prompt tokens run all loops
    logits, cache = _reference_with_exits(load(model_dirs[3]), tokens, exits)
    predicting = logits[len(prompt) - 1 :]  # rows that predicted the generated tokens
    assert predicting.argmax(-1).tolist() == out.token_ids
    expected = torch.log_softmax(predicting, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-4)
    # every cached key, including those the engine filled for exited tokens at skipped positions; the
    # last token's skipped loops are not filled (its request finished: nothing will attend to them)
    table = engine.runner.slot_table
    for slot, layer in enumerate(cache.layers):
        loop = int((table == slot).nonzero()[0, 0])
        n = len(tokens) if loop < exits[-1] else len(tokens) - 1
        torch.testing.assert_close(engine.pool.keys_of(seq)[slot, :, :n], layer.keys[0, :, :n], rtol=0, atol=1e-4)
        torch.testing.assert_close(engine.pool.values_of(seq)[slot, :, :n], layer.values[0, :, :n], rtol=0, atol=1e-4)


def test_kv_sharing_copies_the_exit_loop_and_differs_from_propagation(model_dirs):
    schedule = {"r": [1, 2, 1, 1, 3, 1, 2, 1]}
    prompt = random_prompts([5], seed=5)[0]
    logprobs = {}
    for mode in ("share", "propagate"):
        engine = Engine(load(model_dirs[3]), config=EngineConfig(kv_fill=mode), exit_policy=ScheduledExit(schedule))
        engine.pool.retain_released = True
        engine.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True), request_id="r")
        outs = engine.step()
        seq = engine.running["r"].seq
        outs += _drain(engine)
        out = [o for o in outs if o.finished][0]
        logprobs[mode] = torch.tensor(out.logprobs)
        if mode == "share":
            table = engine.runner.slot_table  # (loops, columns)
            for i, loops in enumerate(schedule["r"][:-1]):
                position = len(prompt) - 1 + i
                for skipped in range(loops, 3):
                    for column in range(table.shape[1]):
                        src, dst = table[loops - 1, column], table[skipped, column]
                        assert torch.equal(engine.pool.keys_of(seq)[dst, :, position], engine.pool.keys_of(seq)[src, :, position])
                        assert torch.equal(engine.pool.values_of(seq)[dst, :, position], engine.pool.values_of(seq)[src, :, position])
    assert not torch.allclose(logprobs["share"], logprobs["propagate"], atol=1e-3)  # the fill matters


# ---------------------------------------------------------------- the confidence rule


def _peaked(path, scale: float):
    """The model with its LM head scaled, so that exit confidences spread over (0, 1]."""
    model = load(path)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def test_threshold_one_never_exits_early_even_at_saturated_confidence(model_dirs):
    engine = Engine(_peaked(model_dirs[3], 1000.0))  # softmax maxima round to exactly 1.0
    outs = engine.generate(random_prompts([3, 8, 5], seed=6), SamplingParams(max_tokens=10, ignore_eos=True, exit_threshold=1.0))
    assert all(o.exit_loops == [3] * 10 for o in outs)


def test_threshold_zero_always_exits_after_the_first_loop(model_dirs):
    engine = Engine(load(model_dirs[3]))
    outs = engine.generate(random_prompts([3, 8, 5], seed=7), SamplingParams(max_tokens=10, ignore_eos=True, exit_threshold=0.0))
    assert all(o.exit_loops == [1] * 10 for o in outs)
    assert engine.exit_loop_counts == [0, 30, 0, 0]


def test_max_loops_caps_every_token(model_dirs):
    engine = Engine(load(model_dirs[3]))
    outs = engine.generate(random_prompts([4, 9], seed=8), SamplingParams(max_tokens=6, ignore_eos=True, max_loops=2))
    assert all(o.exit_loops == [2] * 6 for o in outs)


class RecordingExit(ExitPolicy):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int, float]] = []

    def should_exit(self, request, loops_done, confidence):
        self.seen.append((request.request_id, len(request.output_ids), loops_done, confidence))
        return super().should_exit(request, loops_done, confidence)


def test_a_token_exits_at_the_first_loop_whose_confidence_reaches_the_threshold(model_dirs):
    policy = RecordingExit()
    engine = Engine(_peaked(model_dirs[3], 40.0), exit_policy=policy)
    threshold = 0.6
    outs = engine.generate(random_prompts([3, 8, 5, 12], seed=9), SamplingParams(max_tokens=12, ignore_eos=True, exit_threshold=threshold))
    by_token: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for rid, index, loops, conf in policy.seen:
        by_token.setdefault((rid, index), []).append((loops, conf))
    assert len({loops for o in outs for loops in o.exit_loops}) > 1, "the threshold should give mixed exits"
    for out in outs:
        for index, exit_loop in enumerate(out.exit_loops):
            seen = by_token[(out.request_id, index)]
            first = next((loops for loops, conf in seen if conf >= threshold), 3)
            assert exit_loop == first


# ---------------------------------------------------------------- sampling, stops, limits


def test_seeded_sampling_does_not_depend_on_the_batch(model_dirs):
    model = load(model_dirs[2])
    prompts = random_prompts([5, 9, 2], seed=10)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    together = Engine(model).generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        assert Engine(model).generate([prompt], p)[0].token_ids == out.token_ids
    assert together[0].token_ids != Engine(model).generate([prompts[0]], SamplingParams(**{**params[0].__dict__, "seed": 99}))[0].token_ids


def test_tiny_top_p_is_greedy(model_dirs):
    model = load(model_dirs[2])
    prompts = random_prompts([6, 3], seed=11)
    greedy = Engine(model).generate(prompts, SamplingParams(max_tokens=8))
    nucleus = Engine(model).generate(prompts, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=0))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in nucleus]


def test_stop_strings_stop_tokens_and_length():
    tokenizer = word_tokenizer()
    model = tiny_model("llama")
    prompt = random_prompts([6], seed=12)[0]
    free = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    assert free.text == tokenizer.decode(free.token_ids)
    words = free.text.split(" ")
    stop = " " + words[5]  # cut before the 6th word
    expected = free.text[: free.text.index(stop)]
    stream = []
    engine = Engine(model, tokenizer)
    engine.add_request(prompt, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    while engine.has_unfinished():
        stream += engine.step()
    final = stream[-1]
    assert final.finished and final.finish_reason == "stop"
    assert final.text == expected and "".join(o.new_text for o in stream) == expected
    by_id = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(free.token_ids[3],)))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[3]) + 1]


def test_bad_requests_raise_clear_errors(model_dirs):
    engine = Engine(load(model_dirs[3]), config=EngineConfig(max_model_len=32))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match=r"\[0, 211\)"):
        engine.add_request([5, 211])
    with pytest.raises(ValueError, match="max_model_len 32"):
        engine.add_request([5] * 30, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="max_loops must be in 1..3"):
        engine.add_request([5], SamplingParams(max_loops=4))
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request([5], SamplingParams(stop=("x",)))
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(exit_threshold=1.5), dict(max_tokens=True)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="kv_fill"):
        EngineConfig(kv_fill="zeros")


def test_abort_frees_the_slot(model_dirs):
    engine = Engine(load(model_dirs[2]), config=EngineConfig(max_num_seqs=1))
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), request_id="long")
    engine.add_request([8, 9], SamplingParams(max_tokens=3, ignore_eos=True), request_id="short")
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort("long")
    outs = _drain(engine)
    finals = {o.request_id: o for o in outs if o.finished}
    assert finals["long"].finish_reason == "abort"
    assert finals["short"].finish_reason == "length" and len(finals["short"].token_ids) == 3


# ---------------------------------------------------------------- merged weights, the cheap exit rule


def test_merged_per_depth_weights_equal_lora_at_every_depth_mix(model_dirs):
    """weights='merged' (W' + B_b A_b per depth) is the same model: HF's greedy output at full depth, and
    the LoRA engine's tokens and log-probs under a forced exit schedule (mixed depths in every step)."""
    reference = load(model_dirs[3])
    prompts = random_prompts([4, 23, 1, 9], seed=31)
    merged = Engine(load(model_dirs[3]), config=EngineConfig(max_batch_tokens=16, weights="merged"))
    assert merged.runner.merged_bytes > 0
    for prompt, out in zip(prompts, merged.generate(prompts, SamplingParams(max_tokens=12))):
        assert out.token_ids == hf_greedy(reference, prompt, 12)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    runs = {}
    for weights in ("lora", "merged"):
        engine = Engine(load(model_dirs[3]), config=EngineConfig(max_batch_tokens=10, weights=weights), exit_policy=ScheduledExit(SCHEDULES))
        for rid, prompt in zip(SCHEDULES, random_prompts([6, 19, 2, 11], seed=3)):
            engine.add_request(prompt, params, request_id=rid)
        runs[weights] = {o.request_id: o for o in _drain(engine) if o.finished}
        assert engine.stats["mixed_depth_steps"] > 10
    for rid in SCHEDULES:
        assert runs["merged"][rid].token_ids == runs["lora"][rid].token_ids
        torch.testing.assert_close(torch.tensor(runs["merged"][rid].logprobs), torch.tensor(runs["lora"][rid].logprobs), rtol=0, atol=1e-4)


def _count_head_rows(engine) -> list[int]:
    rows = [0]
    engine.runner.head.register_forward_hook(lambda _m, args, _out: rows.__setitem__(0, rows[0] + args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows


def test_classifier_exit_rule_runs_the_lm_head_only_for_tokens_that_leave(model_dirs):
    from rrt_ray.serve.exit_rules import ExitClassifier, fit_exit_classifier, loop_features

    model = load(model_dirs[3])
    classifier = fit_exit_classifier(model, random_prompts([40] * 8, seed=32), steps=100)
    prompts = random_prompts([3, 8, 5, 12], seed=33)
    normed, _ = loop_features(model, [p[:3] for p in prompts])
    threshold = float(classifier(normed[0], torch.zeros(normed[0].shape[0], dtype=torch.long)).median())
    params = SamplingParams(max_tokens=10, ignore_eos=True, exit_threshold=threshold)
    head_rows = {}
    for rule in ("classifier", "confidence"):
        engine = Engine(load(model_dirs[3]), config=EngineConfig(exit_rule=rule), exit_classifier=classifier)
        counted = _count_head_rows(engine)
        outs = engine.generate(prompts, params)
        generated = sum(len(o.token_ids) for o in outs)
        head_rows[rule] = counted[0]
        if rule == "classifier":
            loops = [n for o in outs for n in o.exit_loops]
            assert 1 in loops and max(loops) > 1, "some tokens should leave early and some stay"
            assert counted[0] == generated == engine.stats["head_rows"]  # one head row per emitted token, none for stayers
    assert head_rows["confidence"] > head_rows["classifier"]  # the confidence rule pays the head at every loop it scores
    with pytest.raises(ValueError, match="needs a fitted ExitClassifier"):
        Engine(load(model_dirs[3]), config=EngineConfig(exit_rule="classifier"))
    saved = ExitClassifier.load(classifier.save(model_dirs[3]).parent)
    torch.testing.assert_close(saved.weight, classifier.weight)


def test_kv_memory_follows_the_requests_in_flight(model_dirs):
    """max_num_seqs 16 x max_model_len 2048: two 32-token requests hold <= 1/10 of a dense pool; the pool
    grows with their tokens and gives the memory back when they leave."""
    engine = Engine(load(model_dirs[3]), config=EngineConfig(max_num_seqs=16, max_model_len=2048))
    text = engine.runner.text_config
    dense = engine.pool.dense_nbytes(text.num_key_value_heads, text.hidden_size // text.num_attention_heads, 4)
    for rid, prompt in zip("ab", random_prompts([16, 16], seed=34)):
        engine.add_request(prompt, SamplingParams(max_tokens=16, ignore_eos=True), request_id=rid)
    sizes = []
    while engine.has_unfinished():
        engine.step()
        sizes.append(engine.pool.nbytes())
    assert 0 < engine.pool.peak_nbytes <= dense / 10
    assert sizes[0] < max(sizes)  # grew as tokens arrived
    assert engine.pool.nbytes() == 0  # and shrank when the requests left
    engine.add_request(random_prompts([40], seed=35)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    assert engine.pool.nbytes() > 0
