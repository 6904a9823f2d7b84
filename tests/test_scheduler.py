"""The engine's scheduling alone, without a model: what `schedule_*` asks for and what `postprocess_*` records."""
from concurrent.futures import Future

from llmhelpers.inference.scheduler import PAUSE, Request, Scheduler

EOS = 0


def started(requests, slots=2, max_len=64, **hooks):
    """A scheduler after its first (forced) prefill, each prefilled item answered with token 7."""
    s = Scheduler(requests, slots=slots, max_len=max_len, eos=EOS, **hooks)
    items = s.schedule_prefill(force=True)
    s.postprocess_prefill([(item, 7) for item in items])
    return s, items


def test_prompts_fill_free_slots_in_order_and_decode_from_their_end():
    reqs = [Request([1, 2, 3], 5), Request([4, 5], 5), Request([6], 5)]
    s, items = started(reqs)
    assert items == [(0, [1, 2, 3], 0), (1, [4, 5], 0)]  # two slots: the third request waits in the queue
    assert s.schedule_decode() == [0, 1]
    assert s.tokens == [7, 7] and s.positions == [3, 2]  # the sampled token goes in after each prompt
    s.postprocess_decode([0, 1], [8, 9])
    assert [r.new_ids for r in reqs[:2]] == [[7, 8], [7, 9]] and s.generated == 2
    assert s.schedule_decode() == [0, 1] and s.positions == [4, 3]


def test_eos_and_budget_free_the_slot_and_the_next_prompt_takes_it():
    finished = []
    reqs = [Request([1, 2], 2), Request([3], 10), Request([4, 4], 3)]
    s, _ = started(reqs, on_finish=finished.append)
    s.postprocess_decode(s.schedule_decode(), [5, EOS])  # request 0 reaches its budget, request 1 says eos
    assert finished == [reqs[0], reqs[1]] and reqs[0].hit_budget and not reqs[1].hit_budget
    assert s.running == {} and s.done == 2
    assert s.schedule_prefill(force=False) == [(0, [4, 4], 0)]  # every live sequence would take part: due


def test_a_free_slot_inside_the_width_decodes_at_position_zero():
    """An ended answer's slot, before a refill: its row is ignored, so its attention should read one cached token,
    not the ended answer's whole cache (the kernel reads every slot up to its position)."""
    reqs = [Request([1, 2, 3], 1), Request([4, 5], 5)]
    s, _ = started(reqs)
    s.postprocess_decode(s.schedule_decode(), [5, 6])  # request 0 reaches its budget
    assert 0 not in s.running and s.schedule_decode() == [1]
    assert s.positions == [0, 3] and s.tokens == [0, 6]


def test_a_step_queued_ahead_sets_free_slots_to_position_zero_too():
    """overlap_steps: a queued step's inputs are last step's tokens at the next positions, except the ones the host
    knows; an ended answer's slot must be among them, or it goes on reading its whole cache until a refill."""
    reqs = [Request([1, 2, 3], 1), Request([4, 5], 5), Request([6], 5)]
    s, _ = started(reqs, slots=3)
    s.postprocess_decode(s.schedule_decode(), [5, 6, 7])  # request 0 reaches its budget
    decoding = s.schedule_decode()
    assert decoding == [1, 2] and s.known_next(decoding) == {0: (0, 0)}


def test_a_lone_free_slot_waits_for_a_prefill_worth_its_cost():
    reqs = [Request([1], 100) for _ in range(110)]
    s, _ = started(reqs, slots=100, max_len=200)
    s.postprocess_decode(s.schedule_decode(), [EOS, EOS] + [9] * 98)  # two slots free; 98 live sequences
    assert s.schedule_prefill(force=False) == []  # 2 prompts < 98 // 32: not yet
    s.postprocess_decode(s.schedule_decode(), [9, 9, EOS] + [9] * 97)  # sampled per slot: slot 2 ends too
    assert s.schedule_prefill(force=False) == [(0, [1], 0), (1, [1], 0), (2, [1], 0)]  # 3 >= 97 // 32


def test_short_appended_text_is_fed_through_decode_steps_and_samples_meanwhile_are_dropped():
    reqs = [Request([1, 2], 20)]
    s, _ = started(reqs, on_token=lambda r, ids: PAUSE if ids[-1] == 8 else None, on_pause=lambda r, ids: [30, 31])
    s.postprocess_decode(s.schedule_decode(), [8])  # 8 pauses: its slot stays, its cache is kept
    assert s.pauses == 1 and s.schedule_decode() is None  # nothing decodes while it is paused ...
    assert s.schedule_prefill(force=False) == []  # ... and two tokens need no prefill: they are fed
    assert s.schedule_decode() == [0] and (s.tokens[0], s.positions[0]) == (8, 3)
    for fed, position in ((30, 4), (31, 5)):
        s.postprocess_decode([0], [99])  # what the model sampled while text was fed is dropped
        assert s.schedule_decode() == [0] and (s.tokens[0], s.positions[0]) == (fed, position)
    s.postprocess_decode([0], [12])
    assert reqs[0].new_ids == [7, 8, 30, 31, 12] and reqs[0].appended == 2 and s.generated == 2


def test_long_appended_text_waits_for_a_batched_prefill_at_the_slots_position():
    future = Future()
    reqs = [Request([1, 2], 20), Request([5], 20)]
    s, _ = started(reqs, on_token=lambda r, ids: PAUSE if ids[-1] == 8 else None, on_pause=lambda r, ids: future)
    s.postprocess_decode(s.schedule_decode(), [8, 9])
    assert s.schedule_prefill(force=True) == []  # its future is not done: slot 0 waits, slot 1 decodes
    assert s.schedule_decode() == [1]
    future.set_result(list(range(40, 80)))  # longer than feed_max
    s.wait_for_tools()
    assert s.schedule_prefill(force=True) == [(0, [8, *range(40, 80)], 3)]
    s.postprocess_prefill([((0, [8, *range(40, 80)], 3), 13)])
    # 3 + 41 ids cached; the sampled 13 goes in at position 44 with the next step
    assert s.schedule_decode() == [0, 1] and (s.tokens[0], s.positions[0]) == (13, 44)


def test_appended_text_that_does_not_fit_ends_the_answer_at_the_budget():
    reqs = [Request([1, 2], 20)]
    s, _ = started(reqs, max_len=10, on_token=lambda r, ids: PAUSE, on_pause=lambda r, ids: [3] * 8)
    s.schedule_prefill(force=True)
    assert reqs[0].finished and reqs[0].hit_budget and reqs[0].new_ids == [7]


def test_the_tail_moves_into_the_lowest_slots():
    reqs = [Request([1], 50) for _ in range(16)]
    s, _ = started(reqs, slots=16, max_len=100)
    sampled = [EOS] * 16
    for slot in (3, 9, 15):
        sampled[slot] = 5
    s.postprocess_decode(s.schedule_decode(), sampled)
    assert s.compact() == [(9, 0, 3), (15, 1, 3)]  # (from, to, cache length); slot 3 already fits
    assert s.width == 8 and sorted(s.running) == [0, 1, 3]
    assert [s.running[i].request for i in (0, 1, 3)] == [reqs[9], reqs[15], reqs[3]]
    assert s.compact() == []
