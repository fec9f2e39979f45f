"""Pieces of OpenAI response bodies: usage, logprobs, server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from ..engine.request import CompletionOutput, RequestOutput
from .errors import APIError


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    # as OpenAI reports it: prompt tokens whose K/V came from the prefix cache
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _entry(lps, token: int, tokenizer) -> tuple[str, float]:
    lp = lps[token]
    text = lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([token])
    return text, lp.logprob


def chat_logprobs(c: CompletionOutput, start: int, end: int, top_n: int, tokenizer) -> dict | None:
    """OpenAI chat `logprobs.content` for tokens [start, end) of a completion."""
    if c.logprobs is None:
        return None
    content = []
    for token, lps in zip(c.token_ids[start:end], c.logprobs[start:end]):
        text, value = _entry(lps, token, tokenizer)
        top = sorted(((tid, lp) for tid, lp in lps.items() if lp.rank is not None and lp.rank <= top_n),
                     key=lambda kv: kv[1].rank)
        content.append({"token": text, "logprob": value, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": _entry(lps, tid, tokenizer)[0], "logprob": lp.logprob,
                                          "bytes": list(_entry(lps, tid, tokenizer)[0].encode())}
                                         for tid, lp in top[:top_n]]})
    return {"content": content}


# JSON has no -infinity: a token the model rules out entirely is reported at this floor (as OpenAI and vLLM do)
LOGPROB_FLOOR = -9999.0


def _top(lps, top_n: int, tokenizer) -> dict[str, float] | None:
    """A position's top-N alternatives as {token text: logprob} (None when top_n is 0)."""
    if not top_n:
        return None
    ranked = sorted(((tid, lp) for tid, lp in lps.items() if lp.rank is not None and lp.rank <= top_n),
                    key=lambda kv: kv[1].rank)
    return {_entry(lps, tid, tokenizer)[0]: max(lp.logprob, LOGPROB_FLOOR) for tid, lp in ranked[:top_n]}


def completion_logprobs(c: CompletionOutput, start: int, end: int, top_n: int, tokenizer, offset: int) -> dict | None:
    """Legacy completions `logprobs` for tokens [start, end); `offset`: text offset of the first one."""
    if c.logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for token, lps in zip(c.token_ids[start:end], c.logprobs[start:end]):
        text, value = _entry(lps, token, tokenizer)
        tokens.append(text)
        values.append(max(value, LOGPROB_FLOOR))
        offsets.append(offset)
        offset += len(text)
        tops.append(_top(lps, top_n, tokenizer))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(prompt_ids: list[int], scored: list | None, top_n: int, tokenizer) -> dict:
    """Legacy completions `logprobs` of an echoed prompt (`scored`: the engine's prompt_logprobs, one per token,
    None where there is no score). The first token has no context to be scored in: its logprob and top are null."""
    scored = scored if scored is not None else [None] * len(prompt_ids)
    tokens, values, tops = [], [], []
    for token, lps in zip(prompt_ids, scored):
        if lps is None:
            tokens.append(tokenizer.decode([token]))
            values.append(None)
            tops.append(None)
            continue
        text, value = _entry(lps, token, tokenizer)
        tokens.append(text)
        values.append(max(value, LOGPROB_FLOOR))
        tops.append(_top(lps, top_n, tokenizer))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": prompt_offsets(prompt_ids, tokenizer)}


def prompt_offsets(prompt_ids: list[int], tokenizer) -> list[int]:
    """Where each prompt token's text starts in the decoded prompt. Counted from the incremental detokenizer, not
    from the tokens' one-token strings: a token holding part of a UTF-8 character decodes alone to U+FFFD, whose
    length is not its share of the text."""
    detokenizer = tokenizer.detokenizer(skip_special_tokens=False)
    offsets, at = [], 0
    for token in prompt_ids:
        offsets.append(at)
        at += len(detokenizer.add(token))
    return offsets


def join_logprobs(first: dict, second: dict | None) -> dict:
    """Two consecutive runs of legacy `logprobs` (the echoed prompt's, then the generated tokens') as one."""
    if second is None:
        return first
    return {key: first[key] + second[key] for key in first}


def next_offset(logprobs: dict | None, default: int) -> int:
    """The text offset just after a run of legacy `logprobs` (where the next token's text starts)."""
    if not logprobs or not logprobs["tokens"]:
        return default
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_stream(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Frame chunks as SSE; an error after the stream began becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield sse(event)
    except APIError as e:
        yield sse(e.body())
    except Exception as e:  # noqa: BLE001 - the client gets a clean error event, the log gets the trace
        import logging

        logging.getLogger("trinity.serve").exception("error while streaming")
        yield sse(APIError(500, f"internal error while streaming ({type(e).__name__})").body())
    yield sse("[DONE]")
