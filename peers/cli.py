"""The `peer` command: serve a block of layers, inspect a swarm, or generate locally."""

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _generate(args: argparse.Namespace) -> int:
    from inference import LocalChain, SamplingParams, Tokenizer, generate, load_block, resolve_model

    source = resolve_model(args.model)
    tokenizer = Tokenizer(source.path)
    blocks = [load_block(source.path, span, args.device, args.dtype) for span in args.split.split(",")]
    chain = LocalChain(blocks)
    prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(temperature=args.temperature, seed=args.seed)
    tokens = []
    for token in generate(chain, prompt, args.max_tokens, params, tokenizer.eos_token_ids):
        tokens.append(token)
    print(tokenizer.decode(tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate locally through a chain of blocks in this process")
    gen.add_argument("prompt", help="the user message (sent through the chat template)")
    gen.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf file")
    gen.add_argument("--split", default="0:10,10:20,20:30", help="comma-separated layer spans, in order")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    gen.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    gen.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from inference import InferenceError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.run(args)
    except (InferenceError, ValueError) as e:
        print(f"peer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
