"""`nanoseek <verb>`: one entry point for every part of the system.

Each verb parses its flags here and calls one function of its subsystem, so `nanoseek --help` shows the
whole surface in one file. Errors a user can fix (bad config, missing file) end with one line, no traceback.
"""
from __future__ import annotations

import argparse
import sys


# ---- info --------------------------------------------------------------------------------------------
def _add_info(sub):
    p = sub.add_parser("info", help="parameter counts and cache sizes of a config")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="tiny | small | v2-lite | v3")
    g.add_argument("--config", default=None, help="path to an HF config.json (or its directory)")
    p.add_argument("--forward", action="store_true", help="also run a forward pass of a random model")

    def run(a):
        from .info import main
        main(preset=a.preset, config=a.config, forward=a.forward)
    p.set_defaults(func=run)


# ---- train: prepare, train, plot, generate, demo ----------------------------------------------------------
def _add_prepare(sub):
    p = sub.add_parser("prepare", help="train a byte-level BPE tokenizer and write token shards")
    p.add_argument("--input", nargs="+", default=None, metavar="FILE",
                   help="text / JSONL / parquet files (default: the embedded corpus)")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="reuse this tokenizer instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--text-key", default="text", help="field holding the text in JSONL / parquet rows")
    p.add_argument("--seed", type=int, default=0)

    def run(a):
        from .data.prepare import prepare
        info = prepare(a.input, a.out, vocab_size=a.vocab_size, tokenizer=a.tokenizer,
                       val_fraction=a.val_fraction, seed=a.seed, text_key=a.text_key)
        print(", ".join(f"{k} {v}" for k, v in info.items()))
    p.set_defaults(func=run)


def _add_train(sub):
    p = sub.add_parser("train", help="pretrain with the DeepSeek-V3 recipe from a TOML / YAML config")
    p.add_argument("--config", default=None, help="TOML or YAML file (see --print-config)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue from a checkpoint or run directory (bare: the config's run.out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print every field, its default and its meaning")

    def run(a):
        if a.print_config:
            from .train.config import reference_toml
            print(reference_toml(), end="")
            return
        from .train.loop import train
        summary = train(a.config, a.resume, a.set)
        if not summary["interrupted"]:
            print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, HF export {summary['final']}")
    p.set_defaults(func=run)


def _add_plot(sub):
    p = sub.add_parser("plot", help="PNG of a run's train/val loss, MTP loss and expert load balance")
    p.add_argument("run", help="run directory (or its metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/loss.png)")

    def run(a):
        from .train.plot import plot
        print(plot(a.run, a.out))
    p.set_defaults(func=run)


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample from a checkpoint")
    p.add_argument("--ckpt", required=True,
                   help="training checkpoint, run directory, or any HF deepseek_v3 checkpoint directory")
    p.add_argument("--prompt", action="append", default=None, help="repeatable (default: the demo prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="when the checkpoint has no tokenizer files")
    p.add_argument("--device", default="auto")

    def run(a):
        from .train.sample import sample
        if a.prompt is None:
            from .data.corpus import default_prompts
            a.prompt = default_prompts()
        outs = sample(a.ckpt, a.prompt, tokenizer=a.tokenizer, device=a.device, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
        for prompt, text in zip(a.prompt, outs):
            print(f"{prompt}{text}")
            print("-" * 40)
    p.set_defaults(func=run)


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job: prepare the default corpus, train, plot, sample (~minutes)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=None, help="default: configs/demo.toml")
    p.add_argument("--fresh", action="store_true", help="start over instead of continuing an earlier run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")

    def run(a):
        from .train.demo import main
        main(out=a.out, config=a.config, fresh=a.fresh, device=a.device)
    p.set_defaults(func=run)


# ---- serve, chat ------------------------------------------------------------------------------------------
def _add_model_args(p):
    p.add_argument("--ckpt", required=True, help="HF deepseek_v3 checkpoint directory (config.json, safetensors)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer files (default: --ckpt)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    p.add_argument("--max-len", type=int, default=None,
                   help="context: prompt + completion tokens (default: min(max_position_embeddings, 4096))")
    p.add_argument("--speculative", action="store_true",
                   help="MTP speculative decoding (needs an MTP module; greedy output is unchanged)")


def _add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (401 otherwise)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the --ckpt folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (cache slots)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which 503 is answered")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on a request's max_tokens (default: context)")
    p.add_argument("--max-n", type=int, default=8, help="cap on a request's n")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode forward (slow first steps)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds Ctrl-C waits for open requests to finish")

    def run(a):
        from .serve.main import serve
        serve(a.ckpt, host=a.host, port=a.port, api_key=a.api_key, tokenizer=a.tokenizer, device=a.device,
              dtype=a.dtype, max_batch=a.max_batch, max_len=a.max_len, max_waiting=a.max_waiting,
              max_tokens=a.max_tokens, max_n=a.max_n, max_body_bytes=a.max_body_bytes, speculative=a.speculative,
              cuda_graphs=not a.no_cuda_graphs, compile=a.compile, model_name=a.model_name,
              drain_timeout=a.drain_timeout)
    p.set_defaults(func=run)


def _add_chat(sub):
    p = sub.add_parser("chat", help="interactive terminal chat with a checkpoint, streamed")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="per reply")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)

    def run(a):
        from .serve.chat import chat
        chat(a.ckpt, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype, system=a.system,
             max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
             max_len=a.max_len, speculative=a.speculative)
    p.set_defaults(func=run)


# ---- post-training and evaluation: sft, distill, grpo, eval ---------------------------------------------------
def _config_args(p, cls, prefix: str = "", skip: tuple = ()):
    """One flag per field of a post-training config dataclass, documented by the field's doc."""
    import dataclasses
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(f.default_factory if f.default is dataclasses.MISSING
                                                      else f.default):
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        if f.default is dataclasses.MISSING:   # a list: repeatable
            p.add_argument(flag, action="append", default=None, dest=prefix + f.name, help=doc + " (repeatable)")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=prefix + f.name, help=doc)
        else:
            kind = type(f.default) if f.default is not None else str
            p.add_argument(flag, type=kind, default=None, dest=prefix + f.name, help=f"{doc} (default: {f.default})")


def _config(cls, a, prefix: str = "", **fixed):
    """The config from the flags that were given (the rest keep their defaults)."""
    import dataclasses
    given = {f.name: getattr(a, prefix + f.name) for f in dataclasses.fields(cls)
             if getattr(a, prefix + f.name, None) is not None}
    return cls(**{**given, **fixed})


def _add_run_args(p, init_help: str):
    p.add_argument("--init", default=None, help=init_help)
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, final/ (HF export)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (its saved settings win)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _add_sft(sub):
    from .post.sft import SFTConfig
    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL and/or a task's two V3 sample kinds")
    _add_run_args(p, "checkpoint to fine-tune (HF directory, training checkpoint or run directory)")
    _config_args(p, SFTConfig)
    p.add_argument("--write-data", default=None, metavar="FILE",
                   help="only write the conversations (e.g. of --task) as chat JSONL to FILE, and exit")

    def run(a):
        cfg = _config(SFTConfig, a)
        if a.write_data:
            from .post.chat import write_chat_jsonl
            from .post.sft import conversations
            convs = conversations(cfg)
            write_chat_jsonl(a.write_data, convs)
            print(f"{len(convs)} conversations -> {a.write_data}")
            return
        from .post.sft import sft
        s = sft(cfg, a.init, a.out, a.device, a.resume)
        acc = f", held-out accuracy {s['accuracy']:.1%}" if s["accuracy"] is not None else ""
        print(f"done: step {s['step']}{acc}; HF export {s['final']}")
    p.set_defaults(func=run)


def _add_distill(sub):
    from .post.distill import DistillConfig
    from .post.sft import SFTConfig
    p = sub.add_parser("distill", help="rejection-sample a teacher with the engine, fine-tune a student on what "
                                       "the rule-based checker accepts")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--student", required=True, help="student checkpoint to fine-tune")
    p.add_argument("--out", required=True, help="directory: distill.jsonl, distill.json, student/ (the SFT run)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    _config_args(p, DistillConfig)
    _config_args(p, SFTConfig, prefix="sft-", skip=("data", "task", "eval_task", "problems", "kinds"))

    def run(a):
        from .post.distill import distill
        cfg = _config(DistillConfig, a, sft=_config(SFTConfig, a, prefix="sft-"))
        s = distill(cfg, a.teacher, a.student, a.out, a.device)
        print(f"done: kept {s['kept']} of {s['sampled']} teacher samples; student held-out accuracy "
              f"{s['accuracy']:.1%}; HF export {s['final']}")
    p.set_defaults(func=run)


def _add_grpo(sub):
    from .post.grpo import GRPOConfig
    p = sub.add_parser("grpo", help="GRPO with rule-based rewards on a verifiable task (rollouts on the engine)")
    _add_run_args(p, "policy to start from, also the frozen KL reference (e.g. an SFT run's final/)")
    _config_args(p, GRPOConfig)

    def run(a):
        from .post.grpo import grpo
        s = grpo(_config(GRPOConfig, a), a.init, a.out, a.device, a.resume)
        print(f"done: step {s['step']}, held-out accuracy {s.get('start_accuracy', float('nan')):.1%} -> "
              f"{s['accuracy']:.1%}; rollouts {s.get('rollout_tok_per_s', 0):.0f} tokens/s, "
              f"{s.get('gen_share', 0):.0%} of step time generating; plot {s['plot']}; HF export {s['final']}")
    p.set_defaults(func=run)


def _add_eval(sub):
    p = sub.add_parser("eval", help="multiple choice by log-likelihood (acc, acc_norm) and generation tasks "
                                    "(exact match, pass@1, maj@k) on JSONL files and built-in tasks")
    p.add_argument("--ckpt", required=True, help="checkpoint to evaluate")
    p.add_argument("--mc", action="append", default=[], metavar="FILE",
                   help='{"question", "choices", "answer"} JSONL (repeatable)')
    p.add_argument("--gen", action="append", default=[], metavar="FILE",
                   help='{"question", "answer"} JSONL, every line scored (repeatable)')
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help="built-in task, scored on its held-out split (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="items per benchmark (tasks: default 500)")
    p.add_argument("--k", type=int, default=1, help="samples per problem for pass@1 and maj@k (1: greedy only)")
    p.add_argument("--temperature", type=float, default=0.6, help="for the k samples")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompt-style", default="reasoning", choices=["reasoning", "chat", "raw"],
                   help="reasoning: system prompt + question; chat: the question as a user turn; raw: no template")
    p.add_argument("--answer-pattern", default=None, help="regex for the answer when there is no \\boxed{}")
    p.add_argument("--delimiter", default=" ", help="between a multiple-choice question and each option")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="JSON", help="write results and per-item answers here")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="when the checkpoint has no tokenizer files")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")

    def run(a):
        from .eval import run_eval, table
        results = run_eval(a.ckpt, a.mc, a.gen, a.task, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype,
                           limit=a.limit, k=a.k, temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                           style=a.prompt_style, answer_pattern=a.answer_pattern, delimiter=a.delimiter,
                           seed=a.seed, out=a.out, log=lambda *x: None)
        print(table(results))
        if a.out:
            print(f"results: {a.out}")
    p.set_defaults(func=run)


# ---- convert: GGUF for llama.cpp / LM Studio, HF dtypes ----------------------------------------------------------
def _add_convert(sub):
    p = sub.add_parser("convert", help="checkpoint to GGUF (llama.cpp / LM Studio) or to an HF directory in "
                                       "another dtype (bf16 / fp32 / FP8)")
    p.add_argument("--to", required=True, choices=["gguf", "hf"], help="output format")
    p.add_argument("--ckpt", required=True, help="HF deepseek_v3 checkpoint directory (FP8 ones included)")
    p.add_argument("--out", required=True, help="gguf: the .gguf file; hf: a new (or empty) directory")
    p.add_argument("--type", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="gguf: tensor type of the matrices; norms, router and bias stay f32 (default: f16)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp8"],
                   help="hf: weight dtype; fp8: E4M3 with 128x128 weight_scale_inv, the rest bf16 (default: bf16)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="gguf: tokenizer files (default: --ckpt)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="gguf: llama.cpp pre-tokenizer name (default: derived from tokenizer.json)")
    p.add_argument("--no-mtp", action="store_true", help="gguf: leave the MTP (nextn) layers out")

    def run(a):
        from .io.gguf import convert_hf, export_gguf
        wrong = "--dtype" if a.to == "gguf" and a.dtype else "--type" if a.to == "hf" and a.type else None
        if wrong:
            raise ValueError(f"{wrong} does not apply to --to {a.to} (gguf takes --type, hf takes --dtype)")
        if a.to == "gguf":
            import importlib.util
            if importlib.util.find_spec("gguf") is None:
                raise ValueError("--to gguf needs the `gguf` package: pip install 'nanoseek[gguf]'")
            s = export_gguf(a.ckpt, a.out, a.type or "f16", tokenizer=a.tokenizer, mtp=not a.no_mtp,
                            tokenizer_pre=a.tokenizer_pre)
            print(f"{s['out']}: {s['type']}, {s['tensors']} tensors, {s['params']:,} parameters, "
                  f"{s['mtp_layers']} MTP layers, {s['tokens']} tokens (pre-tokenizer {s['pre']}), "
                  f"{s['bytes'] / 2**20:.1f} MiB")
        else:
            s = convert_hf(a.ckpt, a.out, a.dtype or "bf16")
            print(f"{s['out']}: {s['dtype']}, {', '.join(s['files'])}, {s['bytes'] / 2**20:.1f} MiB")
    p.set_defaults(func=run)


COMMANDS = [_add_info, _add_prepare, _add_train, _add_plot, _add_generate, _add_demo, _add_serve, _add_chat,
            _add_sft, _add_distill, _add_grpo, _add_eval, _add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"nanoseek {args.verb}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
