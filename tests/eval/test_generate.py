import json
from contextlib import nullcontext

import pytest
import torch

from tracetune.config import EvalConfig
from tracetune.data.render import end_of_turn_ids, render_prompt
from tracetune.data.traces import EvalItem, load_eval_items
from tracetune.eval import generate, invariance, scoring
from tracetune.eval.evaluate import generate_predictions
from tracetune.eval.generate import _cut, decode_compacting, generate_batch
from tracetune.eval.scoring import compare_predictions, compute_scores, write_scores
from tracetune.layout import read_predictions
from tracetune.models.sources import load_model, load_tokenizer, tiny_model


def _model():
    tokenizer = load_tokenizer("tiny:gemma3")
    model = load_model("tiny:gemma3", tokenizer, seed=0)
    model.eval()
    return tokenizer, model


def test_batched_generation_equals_unbatched_greedy():
    tokenizer, model = _model()
    items = load_eval_items("data/eval.jsonl").records[:6]
    prompts = [render_prompt(tokenizer, i.prompt, "Think.") for i in items]
    cfg = EvalConfig(eval_file=None, max_new_tokens=12)
    stops = end_of_turn_ids(tokenizer)
    batched = generate_batch(model, tokenizer, prompts, cfg, stops)
    single = [generate_batch(model, tokenizer, [p], cfg, stops)[0] for p in prompts]
    assert batched == single
    assert all(g.num_new_tokens == 12 and g.finish_reason == "length" for g in batched)


def test_compacting_greedy_equals_transformers_generate_when_rows_stop_at_different_steps():
    tokenizer, model = _model()
    items = load_eval_items("data/eval.jsonl").records[:6]
    tokenizer.padding_side = "left"
    encoded = tokenizer(
        [render_prompt(tokenizer, i.prompt, "Think.") for i in items], return_tensors="pt", padding=True
    )
    args = (encoded["input_ids"], encoded["attention_mask"], 12)
    free = decode_compacting(model, *args, [])
    stops = sorted({free[0][2], free[3][5], free[5][8]})  # tokens that end some rows early, others later or never
    ours = decode_compacting(model, *args, stops)
    theirs = model.generate(**encoded, max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=0)
    pad = tokenizer.pad_token_id
    cut_ours = [_cut(row, set(stops), pad) for row in ours]
    assert cut_ours == [_cut(row, set(stops), pad) for row in theirs[:, args[0].shape[1] :].tolist()]
    assert len({len(ids) for ids, _ in cut_ours}) > 2  # rows really left the batch at different steps


def _bf16_model_with_gemma3_270m_shapes():
    """Two layers shaped like Gemma 3 270M's (640 wide, 2048 MLP, 4 query heads on one 256-wide key/value head),
    random weights, in bf16: at these shapes this CPU's stock kernels do round a row differently by batch."""
    tokenizer = load_tokenizer("tiny:gemma3")
    shapes = dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4, head_dim=256)
    # An untied head: a tied one mostly repeats the input token.
    model = tiny_model("gemma3", tokenizer, 0, **shapes, query_pre_attn_scalar=256, tie_word_embeddings=False)
    with torch.no_grad():
        # Weights at the scale of a trained model's, so greedy tokens vary (the default init repeats one).
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, weight.shape[1] ** -0.5)
        # Pairs of nearly equal output rows put every greedy choice on a near-tie, so a rounding difference shows.
        head = model.lm_head.weight
        head[1::2] = head[0::2][: head[1::2].shape[0]] + 3e-5 * torch.randn_like(head[1::2])
    return tokenizer, model.to(torch.bfloat16).eval()


def _skip_unless_invariant(model, tokenizer, prompts, cfg, tmp_path):
    """Where this machine's kernels are not batch-invariant (the probe says so), the claim is not made: check that
    an evaluation records it, then skip with the reason. Elsewhere return, and the test checks the claim."""
    probe = invariance.probe_generation(model, tokenizer, prompts)
    if probe["batch_invariant"]:
        return
    items = [EvalItem(str(k), p, "1") for k, p in enumerate(prompts)]
    generate_predictions(model, tokenizer, items, cfg.model_copy(update={"max_new_tokens": 2}), "", tmp_path, seed=0)
    recorded = write_scores(tmp_path, items, "probe-model")["batch_invariance"]
    assert recorded["batch_invariant"] is False
    cpu = invariance.describe_cpu()
    pytest.skip(f"batched bf16 logits differ from one-at-a-time ones on this machine ({cpu}); recorded as such")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_greedy_answers_do_not_depend_on_the_batch(tmp_path, dtype):
    _native_or_fp32(dtype)
    tokenizer, model = _bf16_model_with_gemma3_270m_shapes()
    model = model.to(dtype)
    items = load_eval_items("data/eval.jsonl").records[:20]
    prompts = [render_prompt(tokenizer, i.prompt, "Think step by step.") for i in items]
    cfg = EvalConfig(eval_file=None, max_new_tokens=40)
    _skip_unless_invariant(model, tokenizer, prompts, cfg, tmp_path)
    free = generate_batch(model, tokenizer, prompts, cfg, [])
    assert free == [generate_batch(model, tokenizer, [p], cfg, [])[0] for p in prompts]
    # Rows leaving the batch at different steps (the last one running beside a finished row).
    stops = sorted(
        {
            tokenizer.convert_tokens_to_ids(free[2].completion[11]),
            tokenizer.convert_tokens_to_ids(free[1].completion[6]),
        }
    )
    stopped = generate_batch(model, tokenizer, prompts[:8], cfg, stops)
    assert len({g.num_new_tokens for g in stopped}) > 2
    assert stopped == [generate_batch(model, tokenizer, [p], cfg, stops)[0] for p in prompts[:8]]
    assert stopped[2:5] == generate_batch(model, tokenizer, prompts[2:5], cfg, stops)
    assert free[3:10] == generate_batch(model, tokenizer, prompts[3:10], cfg, [])  # 7 rows: past a block of 4
    assert model.config._attn_implementation == "sdpa"  # generation's attention is put back


@pytest.mark.slow
def test_sampled_answers_do_not_depend_on_the_batch(tmp_path):
    """Each (item, sample) row draws from its own seeded generator, so samples are the same at any batch size
    wherever greedy logits are (the probe), and different seeds give different samples."""
    tokenizer, model = _bf16_model_with_gemma3_270m_shapes()
    items = load_eval_items("data/eval.jsonl").records[:6]
    prompts = [render_prompt(tokenizer, i.prompt, "Think step by step.") for i in items]
    cfg = EvalConfig(eval_file=None, max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.9, num_samples=3)
    _skip_unless_invariant(model, tokenizer, prompts, cfg, tmp_path)
    runs = {}
    for batch_size in (18, 3):
        out = tmp_path / f"b{batch_size}"
        generate_predictions(
            model,
            tokenizer,
            items,
            cfg.model_copy(update={"batch_size": batch_size}),
            "Think step by step.",
            out,
            seed=5,
        )
        runs[batch_size] = {
            r["id"]: [s["completion"] for s in r["samples"]] for r in read_predictions(out / "predictions.jsonl")
        }
    assert runs[18] == runs[3]
    assert all(len(set(samples)) > 1 for samples in runs[3].values())  # three seeds, three different samples
    alone = generate_batch(model, tokenizer, [prompts[0]], cfg, [], seeds=[scoring.sample_seed(5, items[0].id, 1)])
    assert alone[0].completion == runs[3][items[0].id][1]


def test_sampled_scores_count_truncations_as_wrong_and_vote_on_answers():
    def sample(answer, correct, reason="eos"):
        return {"extracted_answer": answer, "correct": correct, "verified": correct, "finish_reason": reason}

    rows = [
        {"expected_answer": "4", "samples": [sample("4", True), sample("4", True, "length"), sample("5", False)]},
        {"expected_answer": "9", "samples": [sample("8", False), sample("8", False), sample("9", True)]},
        {"expected_answer": "2", "samples": [sample("2", True), sample(" 2.", True), sample("3", False)]},
    ]
    scores = scoring.sampled_scores(rows)
    assert scores["num_samples"] == 3 and scores["truncation_rate"] == pytest.approx(1 / 9)
    assert scores["mean_at_k"]["value"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert scores["pass_at"]["1"]["value"] == pytest.approx(scores["mean_at_k"]["value"])
    assert scores["pass_at"]["2"]["value"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # maj@k: item 1 ties 4 and 5 once the truncated 4 is dropped (first reached wins: 4), item 2 votes 8, item 3 votes 2.
    assert scores["maj_at_k"]["value"] == pytest.approx(2 / 3)


def test_the_probe_sees_a_row_that_depends_on_its_batch(tmp_path):
    """A model whose logits move with the number of rows: the probe says so and scores.json records it (in fp32:
    its kernel checks are those every run's env.json makes, measured once a session)."""
    tokenizer, model = _bf16_model_with_gemma3_270m_shapes()
    model = model.float()
    model.lm_head.register_forward_hook(lambda module, args, out: out + 0.01 * out.shape[0])
    prompts = [render_prompt(tokenizer, i.prompt, "Think.") for i in load_eval_items("data/eval.jsonl").records[:6]]
    cfg = EvalConfig(eval_file=None, max_new_tokens=4)
    probe = invariance.probe_generation(model, tokenizer, prompts)
    assert probe["batch_invariant"] is False and probe["num_prompts"] == invariance.PROBE_PROMPTS
    items = [EvalItem(str(k), p, "1") for k, p in enumerate(prompts)]
    generate_predictions(model, tokenizer, items, cfg, "", tmp_path, seed=0)
    assert write_scores(tmp_path, items, "m")["batch_invariance"]["batch_invariant"] is False


def test_kernel_probe_reports_each_check():
    probe = invariance.probe_kernels(torch.float32)
    assert set(probe["checks"]) == {"matmul_rows", "attention_padding"} and probe["dtype"] == "float32"
    assert probe["batch_invariant"] == (probe["checks"]["matmul_rows"] and probe["checks"]["attention_padding"])
    assert isinstance(probe["amx"], bool) and probe["num_threads"] == torch.get_num_threads()
    assert set(probe["first_failures"]) == {name for name, passed in probe["checks"].items() if not passed}
    if generate.can_pack():
        assert "packed_linear" in invariance.probe_kernels(torch.bfloat16)["checks"]


@pytest.mark.skipif(not generate.can_pack(), reason="this torch build or CPU has no oneDNN bf16 kernels to pack for")
def test_packed_linears_give_f_linear_bitwise_and_are_put_back():
    tokenizer, model = _bf16_model_with_gemma3_270m_shapes()
    with_bias = torch.nn.Linear(640, 300).bfloat16()
    if not generate.packs_exactly([*generate._packable(model), with_bias]):
        pytest.skip(f"packed products differ from F.linear here ({invariance.describe_cpu()}): packing is off")
    ids = torch.randint(0, model.config.vocab_size, (5, 37))
    with torch.inference_mode():
        plain = [model(input_ids=ids[:rows]).logits for rows in (1, 2, 5)]
        x = torch.randn(3, 7, 640).bfloat16()
        plain_bias = [with_bias(x[0, :1]), with_bias(x[0]), with_bias(x)]
        with generate.packed_linears(model), generate.packed_linears(with_bias):
            assert "forward" in vars(model.lm_head) and "forward" in vars(model.model.layers[0].mlp.down_proj)
            packed = [model(input_ids=ids[:rows]).logits for rows in (1, 2, 5)]
            packed_bias = [with_bias(x[0, :1]), with_bias(x[0]), with_bias(x)]
    assert all(map(torch.equal, plain + plain_bias, packed + packed_bias))
    assert not any("forward" in vars(m) for m in model.modules())  # nn.Linear.forward again


def test_packed_linears_leave_other_dtypes_and_wrapped_forwards_alone():
    fp32 = torch.nn.Linear(8, 8)
    wrapped = torch.nn.Linear(8, 8).bfloat16()
    hook = wrapped.forward = lambda x: x  # as accelerate's hooks replace a module's forward
    with generate.packed_linears(torch.nn.Sequential(fp32, wrapped)):
        assert "forward" not in vars(fp32) and wrapped.forward is hook
    assert wrapped.forward is hook


@pytest.mark.skipif(not generate.can_pack(), reason="this torch build or CPU has no oneDNN bf16 kernels to pack for")
def test_greedy_answers_are_the_same_with_and_without_packed_linears(monkeypatch):
    tokenizer, model = _bf16_model_with_gemma3_270m_shapes()
    if not generate.packs_exactly(generate._packable(model)):
        with generate.packed_linears(model):  # packing stays off where it would change a bit
            assert not any("forward" in vars(m) for m in model.modules())
        pytest.skip(f"packed products differ from F.linear here ({invariance.describe_cpu()}): packing is off")
    items = load_eval_items("data/eval.jsonl").records[:6]
    prompts = [render_prompt(tokenizer, i.prompt, "Think step by step.") for i in items]
    cfg = EvalConfig(eval_file=None, max_new_tokens=30)
    packed = generate_batch(model, tokenizer, prompts, cfg, [])
    monkeypatch.setattr(generate, "packed_linears", lambda model: nullcontext())
    assert packed == generate_batch(model, tokenizer, prompts, cfg, [])


def _native_or_fp32(dtype):
    if dtype == torch.bfloat16 and not generate.can_pack():
        pytest.skip("bf16 is emulated on this CPU: precision auto evaluates in fp32 here, which is checked")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("group", [1, 4])
def test_attention_of_a_row_does_not_depend_on_its_padding(group, dtype):
    """Leading masked positions (in multiples of PAD_MULTIPLE), other rows, and keys past one chunk, decoding and
    prefill, on every machine whose kernel probe says so: the same sweep on other random data checks that the
    probe's verdict is not an accident of its draw."""
    _native_or_fp32(dtype)
    probe = invariance.probe_kernels(dtype, invariance.KernelShapes(groups=(group,)))
    if not probe["checks"]["attention_padding"]:
        pytest.skip(f"attention rounds by padding on this machine ({probe['first_failures']}); the probe says so")
    assert invariance.attention_failures(dtype, group, 256, torch.Generator().manual_seed(1)) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_rows_do_not_depend_on_the_row_count(dtype):
    _native_or_fp32(dtype)
    shapes = invariance.KernelShapes()
    if not invariance.probe_kernels(dtype, shapes)["checks"]["matmul_rows"]:
        pytest.skip(f"matmuls round by row count on this machine ({invariance.describe_cpu()}); the probe says so")
    assert invariance.matmul_row_failures(dtype, shapes.linears, torch.Generator().manual_seed(1)) == []


def test_kernel_probe_sees_prefill_attention_and_linears_that_round_by_batch(monkeypatch):
    """Kernels that round a row by its padding only in prefill, or by the row count only past decode sizes: the
    probe says false and names the shapes."""
    attention = generate.batch_invariant_attention

    def prefill_depends_on_padding(module, query, key, value, mask, **kwargs):
        out, weights = attention(module, query, key, value, mask, **kwargs)
        return (out + 1e-2 * key.shape[2] if query.shape[2] > 1 else out), weights

    linear = torch.nn.functional.linear
    monkeypatch.setattr(invariance, "_probed", {})
    monkeypatch.setenv("TRACETUNE_KERNEL_PROBES", "off")  # patched kernels: measured here, kept nowhere
    monkeypatch.setattr(generate, "batch_invariant_attention", prefill_depends_on_padding)
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: linear(x, w, b) + 1e-3 * (x.shape[0] > 100))
    shapes = invariance.KernelShapes(linears=((64, 32),), groups=(2,), head_dim=16)
    probe = invariance.probe_kernels(torch.float32, shapes)
    assert probe["checks"] == {"matmul_rows": False, "attention_padding": False} and not probe["batch_invariant"]
    assert {f["queries"] > 1 for f in probe["first_failures"]["attention_padding"]} == {True}
    assert {f["rows"] for f in probe["first_failures"]["matmul_rows"]} == {300, 1000}


def test_stop_conditions():
    tokenizer, model = _model()
    prompt = render_prompt(tokenizer, "What is 1 + 1?", "")
    stops = end_of_turn_ids(tokenizer)
    free = generate_batch(model, tokenizer, [prompt], EvalConfig(eval_file=None, max_new_tokens=10), stops)[0]
    # Declare a token the model emits at position k (and not before) a stop id: it must stop there, reason eos.
    ids = tokenizer(free.completion, add_special_tokens=False).input_ids
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])
    forced = EvalConfig(eval_file=None, max_new_tokens=10)
    eos = generate_batch(model, tokenizer, [prompt], forced, [ids[k], *stops])[0]
    assert eos.finish_reason == "eos" and eos.num_new_tokens == k
    cut = free.completion[2:4]
    stopped = generate_batch(
        model, tokenizer, [prompt], EvalConfig(eval_file=None, max_new_tokens=10, stop_strings=[cut]), stops
    )[0]
    assert stopped.finish_reason == "stop" and cut not in stopped.completion


def test_predictions_resume_skips_done_ids_and_drops_a_torn_line(tmp_path):
    tokenizer, model = _model()
    items = load_eval_items("data/eval.jsonl").records[:5]
    cfg = EvalConfig(eval_file=None, max_new_tokens=4, batch_size=2)
    generate_predictions(model, tokenizer, items[:3], cfg, "", tmp_path, seed=0)
    path = tmp_path / "predictions.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "torn", "prom')
    generate_predictions(model, tokenizer, items, cfg, "", tmp_path, seed=0)
    lines = path.read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["id"] for line in lines]  # every line parses
    assert sorted(ids) == sorted(i.id for i in items) and len(ids) == len(set(ids))
    row = json.loads(lines[0])
    expected_keys = {
        "id",
        "prompt",
        "expected_answer",
        "completion",
        "extracted_answer",
        "extraction_rule",
        "correct",
        "match_rule",
        "num_steps",
        "steps_checked",
        "steps_valid",
        "first_bad_step",
        "answer_follows",
        "num_claims",
        "work_valid",
        "verified",
        "num_new_tokens",
        "finish_reason",
        "latency_ms",
        "section",
        "category",
        "difficulty",
    }
    assert set(row) == expected_keys


def _row(i, correct, category="a", reason="eos", rule="answer_marker"):
    return {
        "id": str(i),
        "correct": correct,
        "category": category,
        "section": None,
        "difficulty": "easy",
        "finish_reason": reason,
        "extraction_rule": rule,
        "num_steps": 2,
        "latency_ms": 100.0,
        "num_new_tokens": 10,
    }


def test_compute_scores():
    rows = [_row(0, True), _row(1, False, "b", "length", "none"), _row(2, True, "b"), _row(3, False)]
    scores = compute_scores(rows)
    assert scores["accuracy"] == 0.5 and scores["num_items"] == 4
    assert scores["by_category"]["b"]["num_correct"] == 1 and "by_section" in scores and scores["by_section"] == {}
    assert scores["format"]["truncation_rate"] == 0.25 and scores["format"]["extraction_rate"] == 0.75
    assert scores["throughput"]["new_tokens_per_s"] == 100.0 and scores["throughput"]["items_per_s"] == 10.0
    low, high = scores["ci95"]
    assert low < 0.5 < high


def test_compare_predictions_lists_flips(tmp_path):
    for name, flags in (("base", [False, True, False, True]), ("final", [True, True, True, False])):
        (tmp_path / name).mkdir()
        rows = [_row(i, f) for i, f in enumerate(flags)]
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = compare_predictions(tmp_path / "base", tmp_path / "final")
    assert result["improved_ids"] == ["0", "2"] and result["regressed_ids"] == ["3"]
    assert result["difference"] == 0.25 and result["num_paired_items"] == 4


def test_read_predictions_ignores_missing_file_and_torn_lines(tmp_path):
    assert read_predictions(tmp_path / "none.jsonl") == []
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b', encoding="utf-8")
    assert read_predictions(path) == [{"id": "a"}]
    assert EvalItem("a", "p", "1").category is None


def test_kernel_probes_are_kept_across_processes_for_this_machine_build_and_code(tmp_path, monkeypatch):
    """A probe measured once is read back by a later process (the record says so); another dtype, shape or
    probe code is another entry; "off" measures every time."""
    shapes = invariance.KernelShapes(linears=((8, 8),), groups=(1,), head_dim=8)
    monkeypatch.setenv("TRACETUNE_KERNEL_PROBES", str(tmp_path))
    monkeypatch.setattr(invariance, "_probed", {})
    first = invariance.probe_kernels(torch.float32, shapes)
    assert not first["cached"] and len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(invariance, "_probed", {})  # a new process
    again = invariance.probe_kernels(torch.float32, shapes)
    assert again["cached"] and again["checks"] == first["checks"] and again["measured_at"] == first["measured_at"]
    other = invariance.KernelShapes(linears=((16, 8),), groups=(1,), head_dim=8)
    invariance.probe_kernels(torch.float32, other)
    assert len(list(tmp_path.glob("*.json"))) == 2
    monkeypatch.setenv("TRACETUNE_KERNEL_PROBES", "off")
    monkeypatch.setattr(invariance, "_probed", {})
    assert not invariance.probe_kernels(torch.float32, shapes)["cached"]
