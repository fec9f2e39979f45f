"""The `trinity` command: generate, chat, init."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence

from .config import PRESETS
from .engine.config import EngineConfig
from .quant.scheme import QUANTIZATION_CHOICES

_request_ids = itertools.count()


QUANTIZATION_HELP = ("fp8: quantize the weights to FP8 while loading (--dtype fp8 is the same); awq, gptq, "
                     "compressed-tensors: the checkpoint's own method, checked (a quantized checkpoint loads as it "
                     "says without the flag)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder or preset (%s); default: the built-in model" % ", ".join(PRESETS))
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (auto: config dtype on "
                                                   "GPU, float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_CHOICES, help=QUANTIZATION_HELP)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be an integer >= 1")
    return value


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trinity", description="Run the Arcee Trinity model family.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and stream the text")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--no-think", action="store_true", help="with --chat: no thinking prefill")
    _add_sampling_args(gen, max_tokens=64)

    chat = sub.add_parser("chat", help="interactive chat; reasoning is shown dimmed")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--no-think", action="store_true", help="no thinking prefill")
    _add_sampling_args(chat, max_tokens=512)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (vLLM's flag names)")
    srv.add_argument("model", nargs="?", default=None,
                     help="checkpoint folder or preset; default: the built-in model")
    srv.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", default=None, help="name clients use (default: the model's)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes")
    srv.add_argument("--dtype", default="auto")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_CHOICES, help=QUANTIZATION_HELP)
    EngineConfig.add_cli_arguments(srv.add_argument_group("engine"))  # one flag per EngineConfig field
    srv.add_argument("--chat-template", default=None, help="a jinja file replacing the model's chat template")
    srv.add_argument("--reasoning-parser", default="trinity", choices=["trinity", "deepseek_r1", "none"])
    srv.add_argument("--enable-auto-tool-choice", action="store_true")
    srv.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "qwen3_coder"])
    srv.add_argument("--max-queued-requests", type=int, default=None,
                     help="the most sequences (n x prompts of each request) admitted and not yet generating; a "
                          "request that would pass it gets 503 queue_full with Retry-After (400 if it alone asks "
                          "for more)")
    srv.add_argument("--max-request-bytes", type=int, default=4 << 20)
    srv.add_argument("--allowed-origins", default="", help="comma-separated CORS origins")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds to let in-flight requests finish after SIGTERM")
    srv.add_argument("--responses-store-size", type=int, default=1000,
                     help="responses kept in memory for previous_response_id and GET /v1/responses/{id}, the least "
                          "recently used dropped first (0: keep none)")
    srv.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                     help="fcfs: requests are served in arrival order, taking turns between requests, and a request's "
                          "`priority` other than 0 is refused (400); priority: lower `priority` values go first")
    srv.add_argument("--max-completion-prompts", type=_positive_int, default=1024,
                     help="most prompts one /v1/completions request may list (400 above it)")
    srv.add_argument("--max-grammar-compile-seconds", type=float, default=5.0,
                     help="how long a request's JSON Schema (response_format, or the tools under tool_choice) may take "
                          "to compile into a grammar; longer: 400 schema_too_complex")
    srv.add_argument("--log-level", default="info")

    train = sub.add_parser("train", help="train or fine-tune (Muon, SMEBU, RSDB); torchrun for data parallel",
                           description="Options come from --config (TOML or JSON) and can be overridden with "
                                       "--key value for any TrainConfig field, e.g. --steps 200 --lr 1e-3.")
    train.add_argument("--config", default=None)
    train.add_argument("--stage", default=None, choices=["supervised", "grpo"],
                       help="supervised (next-token loss on documents, the default) or grpo (RL on rewards "
                            "computed by code: prompts, group_size, clip_eps, kl_coeff, lora_rank, ... see "
                            "train/grpo_config.py)")

    plan = sub.add_parser("plan", help="memory, tensor-parallel fit, decode bounds and cost on given GPUs")
    _add_plan_args(plan)

    bench = sub.add_parser("bench", help="load driver for any OpenAI-compatible endpoint (TTFT, tok/s, KV usage)")
    _add_bench_args(bench)

    init = sub.add_parser("init", help="write a random-weight checkpoint for a preset (for benchmarks)")
    init.add_argument("--preset", required=True, choices=list(PRESETS))
    init.add_argument("--out", required=True)
    init.add_argument("--dtype", default="bfloat16")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--max-shard-size", default="5GB")
    init.add_argument("--expert-layout", default="per_expert", choices=["per_expert", "stacked"])

    quant = sub.add_parser("quantize", help="write a compressed-tensors FP8 or W4A16 (RTN, AWQ, GPTQ) checkpoint, "
                                            "one decoder layer at a time")
    _add_quantize_args(quant)
    return parser


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float checkpoint folder, or trinity-tiny (the built-in model)")
    p.add_argument("--scheme", required=True, choices=["fp8-block", "fp8-channel", "w4a16"])
    p.add_argument("--method", default="rtn", choices=["rtn", "awq", "gptq"], help="w4a16 only (default rtn)")
    p.add_argument("--group-size", type=_positive_int, default=128, help="w4a16: input columns per scale")
    p.add_argument("--calibration", default=None, help="jsonl of chat conversations (messages, with assistant "
                                                       "reasoning_content); default: synthetic conversations")
    p.add_argument("--num-samples", type=_positive_int, default=128, help="calibration conversations")
    p.add_argument("--max-tokens", type=_positive_int, default=512, help="tokens per calibration conversation")
    p.add_argument("--min-expert-tokens", type=int, default=32,
                   help="a MoE expert routed fewer calibration tokens is quantized by RTN")
    p.add_argument("--ignore", action="append", default=[],
                   help="another module name (or re:pattern) to leave in float; repeatable")
    p.add_argument("--max-memory", default=None,
                   help="fail when the peak resident memory grows by more than this (e.g. 200MB)")
    p.add_argument("--out", required=True)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "train":
        build_parser().parse_args(argv)  # reports the unknown flags the usual way
    args.overrides = _overrides(extra)
    try:
        if args.command in ("generate", "chat", "serve", "train"):
            from . import switches

            switches.get()  # a bad TRINITY_* value: one clear line now, not an error inside the first step
        if args.command == "init":
            return _cmd_init(args)
        if args.command == "quantize":
            return _cmd_quantize(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "chat":
            return _cmd_chat(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "train":
            return _cmd_train(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"trinity {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _params(args):
    from .engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _engine(loaded):
    from .engine import LLMEngine

    # One conversation at a time: a small cache sized to the context we may need.
    return LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(max_num_seqs=4, seed=None))


def _stream_text(engine, prompt_ids: list[int], params):
    """Yields text deltas of one completion (stop tokens and stop strings are handled by the engine)."""
    request_id = f"cli-{next(_request_ids)}"
    engine.add_request(request_id, prompt_token_ids=prompt_ids, params=params)
    sent = 0
    try:
        while engine.has_unfinished():
            for out in engine.step():
                text = out.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
    finally:
        engine.abort(request_id)  # on Ctrl-C mid-stream: free the request's blocks


def _cmd_generate(args) -> int:
    from .loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    if args.chat:
        prompt_ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True,
                                                          enable_thinking=not args.no_think)
    else:
        prompt_ids = loaded.tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    for delta in _stream_text(_engine(loaded), prompt_ids, _params(args)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_chat(args) -> int:
    from rich.console import Console

    from .loading import load_model
    from .serve.reasoning import get_reasoning_parser  # pure Python: no server packages imported

    console = Console(highlight=False)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization)
    engine = _engine(loaded)
    params = _params(args)
    console.print(f"[bold]trinity chat[/bold] · model [cyan]{loaded.name}[/cyan] on {loaded.model.device} · "
                  "/reset clears the history, /exit or Ctrl-D quits")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = console.input("[bold green]> [/bold green]")
        except EOFError:
            console.print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = loaded.tokenizer.apply_chat_template(history, enable_thinking=not args.no_think)
        splitter = get_reasoning_parser("trinity")(starts_in_reasoning=prompt.endswith("<think>\n"))
        reasoning, content = [], []
        try:
            for delta in _stream_text(engine, loaded.tokenizer.encode(prompt), params):
                r, c = splitter.feed(delta)
                _show(console, r, c, reasoning, content)
            _show(console, *splitter.flush(), reasoning, content)
        except KeyboardInterrupt:
            console.print("[yellow] (interrupted)[/yellow]")
        console.print()
        turn = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            turn["reasoning_content"] = "".join(reasoning)
        history.append(turn)


def _show(console, reasoning: str, content: str, reasoning_acc: list[str], content_acc: list[str]) -> None:
    if reasoning:
        console.print(reasoning, style="dim", end="", markup=False)
        reasoning_acc.append(reasoning)
    if content:
        if reasoning_acc and not content_acc:
            console.print()
        console.print(content, end="", markup=False)
        content_acc.append(content)


def _overrides(extra: list[str]) -> dict[str, str]:
    """`--key value` / `--key=value` pairs (a bare `--flag` means true) -> {key: value}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}")
        key, _, value = token[2:].partition("=")
        if not value:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1
            else:
                value = "true"
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _cmd_train(args) -> int:
    from .train.trainer import Trainer, load_train_config

    overrides = dict(args.overrides, **({"stage": args.stage} if args.stage else {}))
    cfg = load_train_config(args.config, overrides)
    if cfg.stage == "grpo":
        return _cmd_train_grpo(cfg)
    if not cfg.data:
        raise ValueError("no training data: set `data` in the config or pass --data PATH[,PATH...]")
    trainer = Trainer(cfg)
    history = trainer.run()
    if history and trainer.rank == 0:  # one summary line, not one per data-parallel process
        print(json.dumps({"steps": history[-1]["step"], "first_loss": history[0]["loss"],
                          "final_loss": history[-1]["loss"], "out_dir": cfg.out_dir}))
    return 0


def _cmd_train_grpo(cfg) -> int:
    from .train.grpo import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    history = trainer.run()
    if history:
        print(json.dumps({"steps": history[-1]["step"], "first_reward": history[0]["reward_mean"],
                          "final_reward": history[-1]["reward_mean"], "final_kl": history[-1]["kl"],
                          "out_dir": cfg.out_dir, "curves": trainer.curves}))
    return 0


def _cmd_serve(args) -> int:
    import logging

    from . import switches
    from .serve.server import serve
    from .serve.state import ServerSettings

    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        served_model_name=args.served_model_name, api_key=args.api_key or switches.get().api_key,
        max_queued_requests=args.max_queued_requests, max_request_bytes=args.max_request_bytes,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
        enable_auto_tool_choice=args.enable_auto_tool_choice, chat_template=template,
        allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
        shutdown_timeout=args.shutdown_timeout, responses_store_size=args.responses_store_size,
        scheduling_policy=args.scheduling_policy, max_completion_prompts=args.max_completion_prompts,
        max_grammar_compile_seconds=args.max_grammar_compile_seconds)
    engine_config = EngineConfig.from_cli_args(args)
    model = args.model or args.model_flag
    from .parallel.launch import torchrun_rank

    launched = torchrun_rank()
    if launched is not None and launched[0] > 0 and engine_config.tensor_parallel_size > 1:
        # a torchrun rank other than 0: no HTTP, only its part of the model, until rank 0 stops it
        from .loading import resolve_device
        from .parallel.executor import ModelSource, join_torchrun

        join_torchrun(ModelSource(spec=model, dtype=args.dtype, seed=engine_config.seed or 0,
                                  quantization=args.quantization), engine_config, resolve_device(args.device))
        return 0
    serve(model, settings, engine_config, args.host, args.port, dtype=args.dtype, device=args.device,
          log_level=args.log_level.lower(), quantization=args.quantization)
    return 0


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from .ops.plan import add_arguments  # imported on use, like every sub-command

    add_arguments(p)


def _cmd_plan(args) -> int:
    from .ops.plan import run

    return run(args)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from .ops.bench import add_arguments  # standard library only at import: keeps `trinity --help` fast

    add_arguments(p)


def _cmd_bench(args) -> int:
    from .ops.bench import main as bench_main

    return bench_main(args)


def _cmd_init(args) -> int:
    import torch  # noqa: F401  (imported here so `trinity --help` stays fast)

    from .config import preset
    from .model.checkpoint import parse_dtype
    from .model.init import write_random_checkpoint
    from .tokenizer import build_byte_level_tokenizer

    cfg = preset(args.preset)
    dtype = parse_dtype(args.dtype)
    size_gb = cfg.num_parameters() * torch.empty((), dtype=dtype).element_size() / 1e9
    print(f"writing {args.preset} ({cfg.num_parameters() / 1e9:.2f}B parameters, {size_gb:.1f} GB in {dtype}) "
          f"with random weights to {args.out}", file=sys.stderr)
    write_random_checkpoint(cfg, args.out, dtype=dtype, seed=args.seed, max_shard_size=args.max_shard_size,
                            expert_layout=args.expert_layout)
    build_byte_level_tokenizer().save_pretrained(args.out)
    print(args.out)
    return 0



def _cmd_quantize(args) -> int:
    from .model.checkpoint import parse_size
    from .quant.quantize import QuantizeOptions, quantize_checkpoint

    opts = QuantizeOptions(scheme=args.scheme, method=args.method, group_size=args.group_size,
                           calibration=args.calibration, num_samples=args.num_samples, max_tokens=args.max_tokens,
                           min_expert_tokens=args.min_expert_tokens, ignore=args.ignore,
                           max_memory=parse_size(args.max_memory) if args.max_memory else None)
    print(json.dumps(quantize_checkpoint(args.model, args.out, opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
