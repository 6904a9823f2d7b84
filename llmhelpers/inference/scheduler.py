"""Which slots of the engine do what at each step: the engine's scheduling, apart from the model.

The engine (`llmhelpers.inference.engine`) reads as nano-vllm's: `schedule` → run the model → `postprocess`, over
per-sequence state. This module holds that state and both ends, in plain Python (no tensors), so that it is tested
without a model:

- `schedule_prefill(force)` → the (slot, ids, start) items to prefill now: appended text of resumed slots, then
  queued prompts for the free slots. A prefill has a fixed cost of several decode steps, so unless forced it waits
  until 1/32 of the live sequences (or every one) would take part.
- `schedule_decode()` → the slots whose sampled token counts in this decode step (`tokens`, `positions` and the
  requests' numbers `indices` are its inputs for the first `width` slots), or None when every live sequence waits.
- `postprocess_prefill` / `postprocess_decode` record what the model sampled: a sequence goes on, ends (eos,
  budget, cache full) or pauses (`on_token` returned PAUSE; `on_pause` gives the ids to append, or a Future).
- `compact()` → cache moves: once the queue is empty and half the slots idle, live sequences move into the lowest
  slots and only those are decoded.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Callable

PAUSE = "pause"


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    key: object = None  # whatever the caller uses to match results (problem index, sample number)
    new_ids: list[int] = field(default_factory=list)  # generated and appended tokens, in order
    appended: int = 0  # how many of new_ids were appended by on_pause (not generated)
    appended_spans: list = field(default_factory=list)  # (start, length) in new_ids of each appended text
    hit_budget: bool = False
    finished: bool = False


@dataclass
class Sequence:
    """A request while it holds a slot."""
    request: Request
    index: int = 0  # the request's number in the run: with the position, it keys the slot's draws (draw_seed)
    length: int = 0  # tokens in the slot's cache
    token: int = 0  # the next decode step's input for this slot ...
    position: int = 0  # ... and where it goes
    parked: tuple | None = None  # paused: (ids to append or their Future, the sampled token not yet cached)
    feeding: deque | None = None  # resumed: appended ids still to feed, one per decode step
    waiting: tuple | None = None  # resumed with long text: (slot, ids, start) for the next batched prefill


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Scheduler:
    def __init__(self, requests: list[Request], slots: int, max_len: int, eos: int,
                 on_token: Callable[[Request, list[int]], str | None] | None = None,
                 on_pause: Callable[[Request, list[int]], object] | None = None,
                 on_finish: Callable[[Request], None] | None = None, feed_max: int = 32):
        self.requests, self.slots, self.max_len, self.eos = requests, slots, max_len, eos
        self.on_token, self.on_pause, self.on_finish = on_token, on_pause, on_finish
        self.feed_max = feed_max  # appended text up to this many tokens is fed through decode steps, longer prefilled
        self.queue = list(range(len(requests)))[::-1]
        self.running: dict[int, Sequence] = {}  # slot -> its sequence
        self.width = slots  # decode the first `width` slots
        self.done = self.generated = self.pauses = 0
        self.tokens, self.positions, self.indices = [0] * slots, [0] * slots, [0] * slots  # decode inputs, per slot
        self._parked: list[int] = []  # paused slots, in the order they paused (they resume in that order)
        self._waiting: list[int] = []  # resumed slots due for a prefill, in the order they resumed

    # --- prefill -------------------------------------------------------------------------------------------------
    def schedule_prefill(self, force: bool) -> list[tuple[int, list[int], int]]:
        self._resume_ready()
        due = len(self._waiting) + min(len(self.queue), self.width - len(self.running))
        if not due or not (force or due >= max(1, len(self.running) // 32)):
            return []
        items = []
        for slot in self._waiting:
            items.append(self.running[slot].waiting)
            self.running[slot].waiting = None
        self._waiting = []
        return items + self._refills()

    def postprocess_prefill(self, results: list[tuple[tuple[int, list[int], int], int]]) -> None:
        """(item, sampled token) per prefilled item: the slot's cache now holds the item's ids."""
        for (slot, ids, start), token in results:
            self.running[slot].length = start + len(ids)
            self._accept(slot, token)

    def _refills(self) -> list[tuple[int, list[int], int]]:
        items = []
        for slot in range(self.width):
            if slot in self.running or not self.queue:
                continue
            index = self.queue.pop()
            request = self.requests[index]
            if len(request.prompt_ids) + 1 >= self.max_len:
                raise ValueError(f"a prompt of {len(request.prompt_ids)} tokens does not fit max_len={self.max_len}")
            self.running[slot] = Sequence(request, index)
            items.append((slot, request.prompt_ids, 0))
        return items

    # --- decode --------------------------------------------------------------------------------------------------
    def schedule_decode(self) -> list[int] | None:
        decoding = [s for s, seq in self.running.items() if seq.parked is None and seq.waiting is None]
        if not decoding:
            return None
        # paused slots decode too (one batch shape); they write at their next position, overwritten on resume
        for slot, seq in self.running.items():
            self.tokens[slot], self.positions[slot], self.indices[slot] = seq.token, seq.position, seq.index
        # a free slot inside the width (its answer ended, no refill yet; or the tail before compaction) decodes at
        # position 0: its attention reads one cached token instead of the ended answer's whole cache (14% of a
        # 2,000-answer run's KV reads: bench/decode_time_model.py); its row is ignored, and the next prefill into
        # the slot writes from position 0
        for slot in self._free_inside_width():
            self.tokens[slot] = self.positions[slot] = self.indices[slot] = 0
        return decoding

    def _free_inside_width(self) -> list[int]:
        return [slot for slot in range(self.width) if slot not in self.running]

    def postprocess_decode(self, decoding: list[int], sampled: list[int]) -> None:
        for slot in decoding:
            seq = self.running[slot]
            if seq.feeding:  # appended text goes in; what the model sampled meanwhile is dropped
                seq.token, seq.position = seq.feeding.popleft(), seq.length
                seq.length += 1
                continue
            self.generated += 1
            self._accept(slot, sampled[slot])

    def known_next(self, decoding: list[int]) -> dict[int, tuple[int, int]]:
        """Before this step's tokens are known: the slots whose next input the host knows, as (token, position), for
        a step queued ahead (the engine's overlap_steps): appended text being fed (its next id, at the next position)
        and paused slots (their input stays: a paused slot decodes its last token again each step, and so does the
        step it resumes with, so the queued step stays usable when its tool's output comes); and free slots inside
        the width, at token 0 and position 0 as in `schedule_decode` (else a queued step reads an ended answer's
        whole cache, one position further each step, until a refill: on an H200 on 2026-12-03, 151 s of decode
        with overlapped steps against 140 s without)."""
        known = {slot: (self.running[slot].feeding[0], min(self.positions[slot] + 1, self.max_len - 1))
                 for slot in decoding if self.running[slot].feeding}
        known.update({slot: (self.running[slot].token, self.running[slot].position) for slot in self._parked})
        known.update({slot: (0, 0) for slot in self._free_inside_width()})
        return known

    def wait_for_tools(self) -> None:
        """Every live sequence is paused: block until one's appended text is ready."""
        if not self._waiting:
            wait([self.running[s].parked[0] for s in self._parked if hasattr(self.running[s].parked[0], "done")],
                 return_when=FIRST_COMPLETED)

    # --- the tail ------------------------------------------------------------------------------------------------
    def compact(self) -> list[tuple[int, int, int]]:
        """(from slot, to slot, cached length) moves, when the queue is empty and half the width is idle."""
        if self.queue or self._waiting or not (len(self.running) <= self.width // 2 and self.width > 8):
            return []
        self.width = max(8, next_pow2(len(self.running)))
        free = [s for s in range(self.width) if s not in self.running]
        moves = []
        for slot in sorted(s for s in self.running if s >= self.width):
            dst = free.pop(0)
            seq = self.running[dst] = self.running.pop(slot)
            self._parked = [dst if s == slot else s for s in self._parked]
            moves.append((slot, dst, seq.length))
        return moves

    # --- per-token bookkeeping -----------------------------------------------------------------------------------
    def _finish(self, slot: int, hit: bool = False) -> None:
        request = self.running.pop(slot).request
        request.finished, request.hit_budget = True, hit
        self.done += 1
        if self.on_finish is not None:
            self.on_finish(request)

    def _accept(self, slot: int, token: int) -> None:
        """A sampled token: the sequence decodes on, ends (eos, budget, cache full) or is parked (a pause)."""
        seq = self.running[slot]
        req = seq.request
        req.new_ids.append(token)
        seq.token, seq.position = token, seq.length
        if token == self.eos:
            self._finish(slot)
        elif len(req.new_ids) - req.appended >= req.max_new_tokens or seq.length + 1 >= self.max_len:
            self._finish(slot, hit=True)
        elif self.on_token is not None and self.on_token(req, req.new_ids) == PAUSE:
            self.pauses += 1
            # the sampled token is not cached yet: it is prefilled together with the appended text; until then
            # the slot's decode output is ignored (what it writes at its next position is overwritten)
            seq.parked = (self.on_pause(req, req.new_ids) if self.on_pause else [], token)
            self._parked.append(slot)
        else:
            seq.length += 1

    def _resume_ready(self) -> None:
        """Parked sequences whose text is ready resume. Short text (most tool outputs) is fed through the decode
        steps, one token per step with the slot's samples ignored until it is in: no extra forward pass, no stall
        of the other slots. Longer text waits for the next batched prefill."""
        for slot in list(self._parked):
            seq = self.running[slot]
            extra, token = seq.parked
            if hasattr(extra, "done"):
                if not extra.done():
                    continue
                extra = extra.result()
            seq.parked = None
            self._parked.remove(slot)
            extra = list(extra)
            if seq.length + len(extra) + 2 >= self.max_len:
                self._finish(slot, hit=True)
                continue
            seq.request.appended_spans.append((len(seq.request.new_ids), len(extra)))
            seq.request.new_ids.extend(extra)
            seq.request.appended += len(extra)
            if len(extra) <= self.feed_max:
                seq.token, seq.position = token, seq.length
                seq.length += 1
                if extra:
                    seq.feeding = deque(extra)
            else:
                seq.waiting = (slot, [token, *extra], seq.length)
                self._waiting.append(slot)
