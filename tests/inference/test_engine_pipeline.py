"""The decode engine's pipelined greedy path (finetune/inference/engine.py: the token choice on the device, step
t+1 enqueued before step t's tokens are read), on CPU in fp32: it answers exactly as the host-side pick does
(repetition penalty, stop ids, min_new_tokens, max_new_tokens), a finished row's tokens never change, a row
joining mid-batch or a cancelled row leaves the others unchanged, cancellation frees the row at the next step,
and the graphed path's bookkeeping (padding slots of a batch bucket, the step's static inputs advanced by the
step itself) is exercised with a stand-in graph that re-runs the captured calls."""

from __future__ import annotations

import pytest
import torch

import finetune  # noqa: F401
from finetune.inference import Engine, SamplingParams
from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

from _helpers import RerunGraph
from _helpers import tiny_model as tiny
from test_inference_engine import prompts


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer(str(SMALL_VOCAB))


def host_picked(params: SamplingParams) -> SamplingParams:
    """The same choice through the host-side pick (sampling.py): top_k=1 sampling keeps only the argmax."""
    return SamplingParams(**{**params.__dict__, "do_sample": True, "top_k": 1, "seed": 0})


def run(engine, jobs, join_at=None, cancel=None):
    """Submit `jobs` [(prompt, params)] (those in `join_at` {job index: step} only at that step; `cancel`
    (job index, step): cancelled after that step), step until done, checking after every step that a finished
    request is reported once, in the step it finished, and never changes afterwards. -> the requests."""
    join_at = join_at or {}
    reqs = {i: engine.submit(p, sp) for i, (p, sp) in enumerate(jobs) if i not in join_at}
    frozen: dict[int, list[int]] = {}
    steps = 0
    while engine.has_work() or len(reqs) < len(jobs):
        got = {r.id for r in engine.step()}
        steps += 1
        for i, r in reqs.items():
            if r.finished:
                if i not in frozen:
                    assert r.id in got, f"job {i} finished without being reported"
                    frozen[i] = list(r.output_ids)
                else:
                    assert r.id not in got, f"job {i} reported again after it finished"
                assert r.output_ids == frozen[i], f"job {i} changed after it finished"
        for i, at in join_at.items():
            if at == steps:
                reqs[i] = engine.submit(*jobs[i])
        if cancel and cancel[1] == steps:
            reqs[cancel[0]].cancel()
        assert steps < 500
    return [reqs[i] for i in range(len(jobs))]


def free_run(model, tok, p, n=20):
    return Engine(model, tok, max_batch=1).generate([p], SamplingParams(max_new_tokens=n))[0]


def jobs_with_every_rule(model, tok):
    """Five prompts of mixed lengths: plain greedy; a repetition penalty; a stop id met mid-reply; the same stop
    held back by min_new_tokens; a short max_new_tokens."""
    ps = prompts([5, 31, 9, 17, 2], seed=40)
    stop = free_run(model, tok, ps[2])[3]
    held_stop = free_run(model, tok, ps[3])[2]
    return [
        (ps[0], SamplingParams(max_new_tokens=18)),
        (ps[1], SamplingParams(max_new_tokens=14, repetition_penalty=1.3)),
        (ps[2], SamplingParams(max_new_tokens=20, stop_token_ids=(stop,))),
        (ps[3], SamplingParams(max_new_tokens=16, min_new_tokens=6, stop_token_ids=(held_stop,),
                               repetition_penalty=0.8)),
        (ps[4], SamplingParams(max_new_tokens=3)),
    ]


def alone_host_picked(model, tok, jobs):
    return [Engine(model, tok, max_batch=1).generate([p], host_picked(sp))[0] for p, sp in jobs]


def test_pipelined_greedy_answers_as_the_host_pick_with_rows_leaving_and_joining(tok):
    model = tiny(seed=41)
    jobs = jobs_with_every_rule(model, tok)
    want = alone_host_picked(model, tok, jobs)
    assert any(len(w) < jobs[i][1].max_new_tokens for i, w in enumerate(want))  # a stop was met
    # all at once (max_batch 3: two wait, and join as rows finish), then two of them joining a running batch
    engine = Engine(model, tok, max_batch=3)
    assert [r.output_ids for r in run(engine, jobs)] == want
    reqs = run(engine, jobs, join_at={1: 2, 3: 4})
    assert [r.output_ids for r in reqs] == want
    assert [r.finish_reason for r in reqs] == ["length", "length", "stop", reqs[3].finish_reason, "length"]
    assert len(reqs[3].output_ids) >= 6  # min_new_tokens held its stop back
    # the same requests through the host-side pick in one batch (the step the pipelined path replaced)
    assert [r.output_ids for r in run(Engine(model, tok, max_batch=3),
                                      [(p, host_picked(sp)) for p, sp in jobs])] == want


@pytest.mark.parametrize("sampled", [False, True])
def test_a_step_is_enqueued_before_the_previous_tokens_are_read(tok, sampled):
    """While the batch does not change, step() enqueues decode step k+1 and then reads step k's tokens (the host
    bookkeeping overlaps the device's step), greedy rows and sampled rows alike."""
    model = tiny(seed=42)
    engine = Engine(model, tok, max_batch=2)
    log = []
    launch, read = engine._launch, engine._read

    def logged_launch():
        step = launch()
        log.append(("launch", id(step)))
        return step

    def logged_read(step, touched):
        log.append(("read", id(step)))
        return read(step, touched)

    engine._launch, engine._read = logged_launch, logged_read
    # both rows run 6 tokens: 1 from the prefill, 5 decoded
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6, do_sample=sampled, top_p=0.9, seed=1)
    reqs = [engine.submit(p, params) for p in prompts([4, 9], seed=43)]
    per_step = []
    while not all(r.finished for r in reqs):
        before = len(log)
        engine.step()
        per_step.append([kind for kind, _ in log[before:]])
    assert per_step == [["launch"]] + [["launch", "read"]] * 5
    launched = [s for kind, s in log if kind == "launch"]
    assert [s for kind, s in log if kind == "read"] == launched[:5]  # in order, each after its successor's launch
    assert not engine.has_work()
    # the step still in flight (the rows had finished) is read and dropped by the next step()
    engine.step()
    assert log[-1] == ("read", launched[-1]) and engine._rows == [] and engine._inflight is None


def test_cancelling_a_row_frees_it_at_the_next_step_and_leaves_the_others_unchanged(tok):
    model = tiny(seed=45)
    ps = prompts([6, 14, 3], seed=46)
    params = SamplingParams(max_new_tokens=12)
    solo = [free_run(model, tok, p, 12) for p in ps]
    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.submit(p, params) for p in ps]
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None  # a step is in flight when the cancel comes
    reqs[1].cancel()
    kept = list(reqs[1].output_ids)
    got = engine.step()
    assert reqs[1] in got and reqs[1].finish_reason == "cancelled" and reqs[1].output_ids == kept
    # the other two stay (their slot order is the prefill's, shortest prompt first)
    assert sorted(r.req.id for r in engine._rows) == sorted([reqs[0].id, reqs[2].id])
    while engine.has_work():
        engine.step()
    assert kept == solo[1][:len(kept)]
    assert [reqs[0].output_ids, reqs[2].output_ids] == [solo[0], solo[2]]
    # and through run(): a cancel after step 3 among rows leaving and joining
    reqs = run(Engine(model, tok, max_batch=2), [(p, params) for p in ps], join_at={2: 2}, cancel=(0, 3))
    assert reqs[0].finish_reason == "cancelled" and reqs[0].output_ids == solo[0][:len(reqs[0].output_ids)]
    assert [reqs[1].output_ids, reqs[2].output_ids] == [solo[1], solo[2]]


def test_a_cancelled_request_waiting_for_a_full_batch_leaves_at_the_next_step(tok):
    """A waiting request was dropped only when the batch changed: behind a full batch, a cancelled one kept its
    place in the queue (and a server's count of requests in flight) until some running row ended."""
    model = tiny(seed=45)
    ps = prompts([6, 9], seed=48)
    params = SamplingParams(max_new_tokens=12)
    solo = free_run(model, tok, ps[0], 12)
    engine = Engine(model, tok, max_batch=1)
    running = engine.submit(ps[0], params)
    for _ in range(3):
        engine.step()
    waiting = engine.submit(ps[1], params)
    engine.step()
    assert engine.occupancy() == (1, 1) and engine._inflight is not None
    waiting.cancel()
    got = engine.step()
    assert waiting in got and waiting.finished and waiting.finish_reason == "cancelled"
    assert waiting.output_ids == [] and engine.occupancy() == (1, 0) and not running.finished
    while engine.has_work():
        engine.step()
    assert running.output_ids == solo


def test_the_graphed_bookkeeping_with_padding_slots_answers_as_the_eager_path(tok, monkeypatch):
    """use_graphs on the CPU with a re-running stand-in for the graph: batch buckets with padding slots, the
    static inputs advanced by the step itself, graphs per (bucket, length bucket, penalty), rows
    leaving and joining, a sampled row switching the batch to the host pick and back."""
    model = tiny(seed=47)
    jobs = jobs_with_every_rule(model, tok)
    want = alone_host_picked(model, tok, jobs)
    engine = Engine(model, tok, max_batch=8, use_graphs=False)
    engine.use_graphs = True  # (a CPU model: Engine refuses use_graphs=True there; the stand-in below)
    keys = []
    monkeypatch.setattr(engine, "_capture", RerunGraph.capturing(engine, keys))
    assert [r.output_ids for r in run(engine, jobs)] == want
    assert keys[0] == (8, 256, True)  # 5 rows: bucket 8, 3 padding slots; a penalised row
    assert any(k[0] < 8 for k in keys)  # rows left: smaller buckets
    # rows holding their stops back and rows past min_new_tokens share the greedy graphs (each key captured once)
    assert len(set(keys)) == len(keys)
    assert [r.output_ids for r in run(engine, jobs, join_at={4: 3, 1: 5})] == want
    sampled = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.7, seed=5)
    alone_sampled = Engine(model, tok, max_batch=1).generate([jobs[0][0]], sampled)[0]
    reqs = run(engine, jobs + [(jobs[0][0], sampled)], join_at={5: 4})
    assert [r.output_ids for r in reqs] == want + [alone_sampled]
    assert any(len(k) == 2 for k in keys)  # the host-picked steps replayed the forward-only graph


def plain_loop(model, tok, prompt, params):
    """The reference: the full forward over the whole sequence at every step, transformers' order of processors
    (repetition penalty, stops masked until min_new_tokens), sampling.pick_one with the request's seeded
    generator."""
    from finetune.inference.sampling import apply_penalties, pick_one

    g = torch.Generator().manual_seed(params.seed)
    stops = sorted({tok.im_end_id, tok.im_start_id, *params.stop_token_ids})
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            seen = torch.zeros(logits.shape[0], dtype=torch.bool)
            seen[ids] = True
            scores = apply_penalties(logits[None], seen[None], torch.tensor([params.repetition_penalty]))[0]
            if len(out) < params.min_new_tokens:
                scores[[t for t in stops if t < scores.shape[0]]] = -float("inf")
            t = int(pick_one(scores, params, g))
            if t in stops:
                break
            out.append(t)
            ids.append(t)
    return out


def test_seeded_sampled_rows_draw_as_pick_one_does_beside_greedy_rows(tok):
    """Sampled rows picked on the device, in a batch with greedy rows and rows joining: each seeded row's tokens
    are those of a plain forward loop drawing with sampling.pick_one from the same seeded generator."""
    model = tiny(seed=48)
    ps = prompts([7, 12, 4, 20], seed=49)
    jobs = [
        (ps[0], SamplingParams(max_new_tokens=14, do_sample=True, temperature=0.8, top_p=0.9, seed=3)),
        (ps[1], SamplingParams(max_new_tokens=10)),
        (ps[2], SamplingParams(max_new_tokens=12, do_sample=True, top_k=20, repetition_penalty=1.2,
                               min_new_tokens=5, seed=4)),
        (ps[3], SamplingParams(max_new_tokens=9, do_sample=True, temperature=1.3, seed=5)),
    ]
    want = [plain_loop(model, tok, p, sp) if sp.do_sample else free_run(model, tok, p, sp.max_new_tokens)
            for p, sp in jobs]
    reqs = run(Engine(model, tok, max_batch=3), jobs, join_at={3: 2})
    assert [r.output_ids for r in reqs] == want
    assert len({tuple(w) for w in want}) == 4


def test_unseeded_sampled_rows_sample_together_beside_greedy_rows(tok):
    """Rows without a seed sample in one batch (sampling.sample_rows, the default generator): reproducible under
    torch.manual_seed, top_k=1 still its argmax, a warm row differs from greedy, the greedy row unchanged."""
    model = tiny(seed=50)
    ps = prompts([5, 9, 13, 6], seed=51)
    greedy = [free_run(model, tok, p, 10) for p in ps]
    jobs = [(ps[0], SamplingParams(max_new_tokens=10)),
            (ps[1], SamplingParams(max_new_tokens=10, do_sample=True, top_k=1, temperature=0.5)),
            (ps[2], SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95)),
            (ps[3], SamplingParams(max_new_tokens=10, do_sample=True, top_k=4, repetition_penalty=1.2))]
    torch.manual_seed(0)
    first = [r.output_ids for r in run(Engine(model, tok, max_batch=4), jobs, join_at={3: 2})]
    torch.manual_seed(0)
    again = [r.output_ids for r in run(Engine(model, tok, max_batch=4), jobs, join_at={3: 2})]
    assert first == again
    assert first[0] == greedy[0] and first[1] == greedy[1]
    penalised_greedy = Engine(model, tok, max_batch=1).generate(
        [ps[3]], SamplingParams(max_new_tokens=10, repetition_penalty=1.2))[0]
    assert first[2] != greedy[2] and first[3] != penalised_greedy


@pytest.mark.parametrize("graphed", [False, True])
def test_a_row_joining_that_grows_the_cache_mid_run_gets_its_solo_tokens(tok, monkeypatch, graphed):
    """A 300-token prompt (beyond seq_length 256: NTK and logN) joins two running rows: the cache grows (length
    256 -> 512, and more slots) between steps, with no step in flight; every row gets its solo tokens."""
    model = tiny(seed=52)
    ps = prompts([6, 11, 300, 4], seed=53)
    params = SamplingParams(max_new_tokens=8, repetition_penalty=1.1)
    solo = [Engine(model, tok, max_batch=1).generate([p], params)[0] for p in ps]
    engine = Engine(model, tok, max_batch=4, use_graphs=False)
    engine.use_graphs = graphed  # (a CPU model: Engine refuses use_graphs=True there; the stand-in below)
    if graphed:
        monkeypatch.setattr(engine, "_capture", RerunGraph.capturing(engine))
    reqs = run(engine, [(p, params) for p in ps], join_at={2: 2, 3: 3})
    assert engine._capacity == 512
    assert [r.output_ids for r in reqs] == solo
