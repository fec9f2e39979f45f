"""The output processor: text, stop strings and logprob strings built from the engine core's per-step deltas."""

from trinity.engine.output_processor import OutputProcessor
from trinity.engine.request import CoreOutput, Logprob, Prefix, SeqUpdate
from trinity.engine.sampling_params import SamplingParams
from trinity.tokenizer import build_byte_level_tokenizer

TOKENIZER = build_byte_level_tokenizer()


def _feed(processor, ids, finish_at=None, logprobs=False):
    """One token per step, as the core sends them; -> the outputs and the stop hits."""
    outs, stops = [], []
    for i, t in enumerate(ids):
        last = finish_at is not None and i == finish_at
        lps = [{t: Logprob(-0.5, 1)}] if logprobs else None
        update = SeqUpdate(0, [t], lps, [-0.5] if logprobs else None, "length" if last else None)
        outs.append(processor.process(CoreOutput("r", [update], finished=last), stops))
        if processor.finished:
            break
    return outs, stops


def test_stop_string_cuts_the_text_and_asks_the_core_to_finish():
    ids = TOKENIZER.encode("hello STOP world")
    params = SamplingParams(stop=["STOP"], max_tokens=50)
    outs, stops = _feed(OutputProcessor("r", None, [1], params, TOKENIZER), ids)
    final = outs[-1].outputs[0]
    assert final.text == "hello " and final.finish_reason == "stop" and final.stop_reason == "STOP"
    assert [(s.request_id, s.index, s.stop) for s in stops] == [("r", 0, "STOP")]
    assert "".join(o.outputs[0].new_text for o in outs) == final.text  # the deltas add up to the text
    # while running, a tail that may start a stop string is held back ("S", "ST", "STO")
    assert all(not o.outputs[0].new_text.endswith(("S", "ST", "STO")) for o in outs)


def test_a_stop_string_beats_the_length_the_core_reports_on_the_same_token():
    ids = TOKENIZER.encode("ab END")
    outs, stops = _feed(OutputProcessor("r", None, [1], SamplingParams(stop=["END"], include_stop_str_in_output=True),
                                        TOKENIZER), ids, finish_at=len(ids) - 1)
    final = outs[-1].outputs[0]
    assert (final.text, final.finish_reason, final.stop_reason) == ("ab END", "stop", "END") and len(stops) == 1


def test_earlier_outputs_keep_their_text_tokens_and_logprobs():
    ids = TOKENIZER.encode("abcdefgh")
    outs, _ = _feed(OutputProcessor("r", None, [1], SamplingParams(logprobs=0), TOKENIZER), ids,
                    finish_at=len(ids) - 1, logprobs=True)
    third = outs[2].outputs[0]
    assert isinstance(third.token_ids, Prefix) and third.token_ids == ids[:3] and len(third.logprobs) == 3
    assert third.text == "abc" and third.new_text == "c"
    final = outs[-1].outputs[0]
    assert isinstance(final.token_ids, list) and final.token_ids == ids and final.text == "abcdefgh"
    assert final.logprobs[0][ids[0]].decoded_token == "a" and final.cumulative_logprob == -0.5 * len(ids)
    assert third.token_ids + [7] == ids[:3] + [7] and [7] + third.token_ids == [7] + ids[:3]


def test_min_tokens_holds_stop_strings_back():
    ids = TOKENIZER.encode("xx yy xx")
    outs, stops = _feed(OutputProcessor("r", None, [1], SamplingParams(stop=["xx"], min_tokens=4), TOKENIZER), ids)
    assert outs[-1].outputs[0].text == "xx yy " and stops[0].stop == "xx"
