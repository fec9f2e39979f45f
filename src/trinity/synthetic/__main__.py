"""`python -m trinity.synthetic [corpus] --out DIR ...` and `python -m trinity.synthetic tokenizer ...`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .conversations import FAMILIES, HELDOUT_MIX, TRAIN_MIX, parse_mix


def _corpus_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trinity.synthetic",
                                description="Write train.jsonl, heldout.jsonl and manifest.json. "
                                            "Sub-command `tokenizer` trains the BPE tokenizer on a corpus.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=60000, help="training conversations")
    p.add_argument("--heldout", type=int, default=300, help="held-out evaluation tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default=None,
                   help="training weights, e.g. arithmetic=0.3,json=0.1 (the families not named keep their default "
                        "weight; rest=0 drops them) (families: %s)" % ", ".join(FAMILIES))
    p.add_argument("--heldout-mix", default=None, help="held-out weights, same form as --mix")
    return p


def _tokenizer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trinity.synthetic tokenizer",
                                description="Train a digit-splitting byte-level BPE tokenizer on a corpus.")
    p.add_argument("--corpus", required=True, help="folder with train.jsonl (or a .jsonl file)")
    p.add_argument("--out", required=True, help="folder for tokenizer.json, tokenizer_config.json, template")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size, special tokens and bytes included")
    p.add_argument("--max-docs", type=int, default=20000, help="conversations sampled for training (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-max-length", type=int, default=None)
    p.add_argument("--split", default="words", choices=["words", "bare", "spaces"],
                   help="pre-tokenizer: words (GPT-2 regex), bare (a word the same tokens everywhere) or spaces "
                        "(fewer tokens); see tokenizer_train.py")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("corpus", "tokenizer") else "corpus"
    try:
        if command == "tokenizer":
            from .tokenizer_train import train_from_corpus  # needs `tokenizers`; the corpus does not

            args = _tokenizer_parser().parse_args(argv)
            tok = train_from_corpus(args.corpus, args.out, args.vocab, args.max_docs or None, args.seed,
                                    args.model_max_length, args.split)
            print(json.dumps({"out": args.out, "vocab_size": tok.vocab_size}))
            return 0
        from .corpus import write_corpus

        args = _corpus_parser().parse_args(argv)
        manifest = write_corpus(args.out, args.train, args.heldout, args.seed, parse_mix(args.mix, TRAIN_MIX),
                                parse_mix(args.heldout_mix, HELDOUT_MIX))
        print(json.dumps({"out": args.out, **{k: manifest[k] for k in ("train", "heldout", "heldout_checks")}}))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m trinity.synthetic {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
