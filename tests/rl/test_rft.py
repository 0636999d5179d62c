"""RFT keeps only verified samples, distinct, capped per prompt; kept traces load back as native traces."""

import json

from tracetune.data.traces import EvalItem, Trace, load_traces
from tracetune.eval.generate import Generation
from tracetune.eval.scoring import score_item
from tracetune.rl.rft import as_trace, keep_verified, round_prompts
from tracetune.rl.rollout import Rollout

ITEM = EvalItem("q1", "Jun buys 2 notebooks at $5 each. How many dollars?", "10")


def _rollout(index: int, text: str, finish: str = "eos") -> Rollout:
    return Rollout(ITEM, index, (), Generation(text, 10, finish), score_item(ITEM, text))


def test_only_verified_distinct_samples_are_kept_up_to_the_cap():
    rollouts = [
        _rollout(0, "Reasoning:\n1. Cost: 2 * 5 = 12\nAnswer: 10"),  # right answer, false step: lucky
        _rollout(1, "Reasoning:\n1. Cost: 2 * 6 = 12\nAnswer: 12"),  # wrong answer
        _rollout(2, "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10", finish="length"),  # cut off
        _rollout(3, "The answer is 10"),  # no Answer: line
        _rollout(3, "Answer: 10"),  # right, but no step was checked (a bare hinted answer)
        _rollout(4, "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10"),  # verified
        _rollout(5, "Reasoning:\n1.  Cost: 2 * 5 = 10\nAnswer:  10"),  # the same text but for white space
        _rollout(6, "Reasoning:\n1. Two notebooks: 2 * 5 = 10\nAnswer: 10"),  # verified, distinct
        _rollout(7, "Reasoning:\n1. Spent: 5 * 2 = 10\nAnswer: 10"),  # verified, past the cap
    ]
    kept = keep_verified(rollouts, max_kept=2)
    assert [r.index for r in kept] == [4, 6]
    assert keep_verified(rollouts[:4], max_kept=2) == []


def test_kept_traces_are_native_traces_marked_with_their_origin(tmp_path):
    records = [
        as_trace(ITEM, "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10", 1, 4, False),
        as_trace(ITEM, "Reasoning:\n1. Cost: 2 * 5 = 10\nAnswer: 10", 2, None, True),
    ]
    path = tmp_path / "kept.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    report = load_traces(path, "native")
    assert not report.errors
    first, second = report.records
    assert first.prompt == ITEM.prompt and first.final_answer == "10"
    assert [s.content for s in first.steps] == ["Cost: 2 * 5 = 10"]
    assert first.meta == {"source": "rft", "round": 1, "sample": 4, "rationalized": False, "of": "q1"}
    assert second.meta["rationalized"] and second.id != first.id


def test_round_prompts_are_a_seeded_draw_per_round():
    traces = [Trace(f"t{i}", f"q{i}", (), str(i)) for i in range(50)]
    assert round_prompts(traces, 1, None, 0) == traces
    one, again, two = round_prompts(traces, 1, 10, 0), round_prompts(traces, 1, 10, 0), round_prompts(traces, 2, 10, 0)
    assert one == again and one != two and len(set(one)) == 10


def test_later_rounds_draw_the_prompts_earlier_rounds_did_not_solve(tmp_path):
    """rft.focus_unsolved: a prompt with max_kept verified samples kept by an earlier round is left out of the
    next draws (read from kept.jsonl, so a resume draws the same); when every prompt is solved, all come back."""
    import json

    from tracetune.layout import TrainingDir
    from tracetune.rl.rft import solved_ids

    traces = [Trace(f"t{i}", f"q{i}", (), str(i)) for i in range(6)]
    kept = TrainingDir(tmp_path).round(1).kept
    kept.parent.mkdir(parents=True)
    rows = [{"meta": {"of": "t0"}}, {"meta": {"of": "t0"}}, {"meta": {"of": "t1"}}, {"meta": {"of": "t2"}},
            {"meta": {"of": "t2"}}]  # fmt: skip
    kept.write_text("".join(json.dumps(r) + "\n" for r in rows))
    solved = solved_ids(tmp_path, before=2, max_kept=2)
    assert solved == {"t0", "t2"} and solved_ids(tmp_path, before=1, max_kept=2) == frozenset()
    assert [t.id for t in round_prompts(traces, 2, None, 0, solved)] == ["t1", "t3", "t4", "t5"]
    assert {t.id for t in round_prompts(traces, 2, 3, 0, solved)} <= {"t1", "t3", "t4", "t5"}
    assert round_prompts(traces, 2, None, 0, frozenset(t.id for t in traces)) == traces
