"""AsyncEngine: streaming, concurrency, cancellation frees the KV blocks, bad requests fail early."""

import asyncio
import time

import pytest

from engine_helpers import random_prompts
from trinity.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from trinity.engine.async_engine import AsyncEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(params=[False, True], ids=["sync", "lookahead"])
def async_engine(model, request):
    ae = AsyncEngine(LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=8,
                                                         max_num_batched_tokens=16,
                                                         async_scheduling=request.param))).start()
    yield ae
    ae.shutdown()
    assert ae._thread is None


def pools_free(engine) -> bool:
    kv = engine.kv
    return kv.full.num_free == kv.full.num_blocks and kv.sliding.num_free == kv.sliding.num_blocks


async def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_stream_grows_and_ends_finished(model, async_engine):
    prompt = random_prompts([9], seed=1)[0]
    offline = LLM(model, num_kv_blocks=64).generate(prompt_token_ids=[prompt], sampling_params=GREEDY)[0]

    async def main():
        return [out async for out in async_engine.generate(prompt_token_ids=prompt, params=GREEDY)]

    outs = asyncio.run(main())
    assert len(outs) == 12
    for i, out in enumerate(outs):
        assert len(out.outputs[0].token_ids) == i + 1
        assert out.finished == (i == 11)
        assert out.prompt_token_ids == prompt
    assert outs[-1].outputs[0].token_ids == offline.outputs[0].token_ids
    assert outs[-1].outputs[0].finish_reason == "length"
    assert pools_free(async_engine.engine) and async_engine.num_in_flight == 0


def test_concurrent_streams_equal_offline(model, async_engine):
    prompts = random_prompts([3, 8, 15, 22, 30, 41], seed=2)
    offline = LLM(model, num_kv_blocks=128).generate(prompt_token_ids=prompts, sampling_params=GREEDY)

    async def consume(i, p):
        last = None
        async for out in async_engine.generate(prompt_token_ids=p, params=GREEDY, request_id=f"c{i}"):
            assert out.request_id == f"c{i}"
            last = out
        return last

    async def main():
        return await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))

    finals = asyncio.run(main())
    assert [f.outputs[0].token_ids for f in finals] == [o.outputs[0].token_ids for o in offline]
    assert all(f.finished for f in finals)
    assert async_engine.engine.num_steps < sum(len(p) for p in prompts)  # they really ran together
    assert pools_free(async_engine.engine)


def test_breaking_out_of_a_stream_aborts_and_frees(async_engine):
    engine = async_engine.engine
    long_params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    prompt = random_prompts([30], seed=3)[0]

    async def main():
        got = 0
        async for out in async_engine.generate(prompt_token_ids=prompt, params=long_params, request_id="brk"):
            got = len(out.outputs[0].token_ids)
            if got == 3:
                break
        assert got == 3
        assert await wait_until(lambda: pools_free(engine) and not engine.requests)
        assert engine.num_generated_tokens < 400  # stopped early, not run to the end
        # the engine goes on serving
        outs = [o async for o in async_engine.generate(prompt_token_ids=prompt, params=GREEDY)]
        return outs[-1]

    final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 12
    assert pools_free(engine) and async_engine.num_in_flight == 0


def test_cancelling_a_consumer_task_aborts_and_frees(async_engine):
    engine = async_engine.engine
    long_params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, n=2)
    prompts = random_prompts([20, 25], seed=4)

    async def main():
        seen = asyncio.Event()
        got = []

        async def consume(p, rid):
            async for out in async_engine.generate(prompt_token_ids=p, params=long_params, request_id=rid):
                got.append(out)
                seen.set()

        tasks = [asyncio.create_task(consume(p, f"t{i}")) for i, p in enumerate(prompts)]
        await asyncio.wait_for(seen.wait(), 10)
        assert await wait_until(lambda: engine.kv.full.num_used > 0)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert await wait_until(lambda: pools_free(engine) and not engine.requests and not engine.has_unfinished())
        return got

    got = asyncio.run(main())
    assert got and not any(o.finished for o in got)
    assert engine.num_generated_tokens < 400
    assert async_engine.num_in_flight == 0


def test_bad_request_raises_before_any_output(async_engine):
    async def first(**kw):
        outs = []
        async for out in async_engine.generate(**kw):
            outs.append(out)
        return outs

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(first(prompt_token_ids=[]))
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(first(prompt_token_ids=[11] * 5, params=SamplingParams(max_tokens=10_000)))
    with pytest.raises(ValueError, match="never fit"):  # 256 blocks of 4 tokens
        asyncio.run(first(prompt_token_ids=[11] * 1100, params=SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError, match="no tokenizer"):
        asyncio.run(first(prompt="hi"))
    assert async_engine.num_in_flight == 0 and not async_engine.engine.requests

    async def duplicate():
        gen = async_engine.generate(prompt_token_ids=[11, 12], params=GREEDY, request_id="dup")
        first_out = await gen.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await async_engine.generate(prompt_token_ids=[11, 12], params=GREEDY, request_id="dup").__anext__()
        await gen.aclose()
        return first_out

    assert not asyncio.run(duplicate()).finished
    assert pools_free(async_engine.engine) or asyncio.run(wait_until(lambda: pools_free(async_engine.engine)))


def test_shutdown_stops_the_thread(model):
    ae = AsyncEngine(LLMEngine(model, None, EngineConfig(block_size=4, num_kv_blocks=16))).start()
    thread = ae._thread
    assert thread.is_alive()
    ae.shutdown()
    assert not thread.is_alive() and ae._thread is None
