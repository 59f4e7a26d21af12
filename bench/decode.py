"""Decode throughput: nanoseek's engine vs transformers' `generate` on identical weights (DESIGN.md §5).

    python bench/decode.py [--preset small] [--batches 1,16,64] [--prompt 512] [--new 128] [--speculative]
    python bench/decode.py --preset v2-lite --batches 1,16

nanoseek's random bf16 weights are saved as an HF checkpoint and loaded by DeepseekV3ForCausalLM, so both run
the same model on the same prompts (random tokens, equal lengths, no padding), greedy, EOS ignored. Per batch:
tokens/s end to end (prefill included, as `generate` reports it), nanoseek's decode step time, and how the two
greedy outputs agree. Random weights make near-ties common and bf16 arithmetic differs between the two, so free
-running outputs part after a few tokens (on CPU at small's shapes, 4 layers, 200 tokens, either model in bf16
agrees with its own fp32 self on only ~91% of argmaxes; in fp32 the two agree to 1e-5, tests/test_model_hf_parity).
The teacher-forced check (both score transformers' output sequence: argmax agreement and logit error per
position) is the closer measure. Also: cache bytes per token (MLA
latents; transformers 5 caches the latents too, measured on its cache; per-head K/V for reference) and the
batch-1 bound set by memory bandwidth: (activated weights without the embedding + latent cache) bytes per token
/ measured copy bandwidth.
Prints a table and one JSON line (also written to $OUT/decode.json when OUT is set).
"""
import argparse
import gc
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_tb_s, env, timed, write_json  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.infer.cache import LatentCache  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sample import SamplingParams  # noqa: E402
from nanoseek.info import cache_bytes_per_token, count  # noqa: E402
from nanoseek.io import save_hf  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402


class NoText:
    """The engine detokenizes as it goes; the bench only counts tokens."""
    eos_id = None

    def decode(self, ids):
        return ""


def run_nanoseek(engine, prompts, new):
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    reqs = [engine.submit(p, params) for p in prompts]
    engine.run_until_done()
    return [r.tokens for r in reqs]


def run_hf(hf, prompts, new):
    ids = torch.tensor(prompts, device="cuda")
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:].tolist(), out.past_key_values


def hf_cache_bytes(cache, batch: int) -> int:
    """Bytes per token of transformers' cache, summed over its layers' key and value tensors."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    tokens = batch * tensors[0].shape[-2]
    return sum(t.numel() * t.element_size() for t in tensors) // tokens


@torch.no_grad()
def teacher_forced(hf, model, seq, prompt_len):
    """Both models score one sequence in one forward: per generated position, do their argmaxes agree, and how
    far apart are their logits."""
    ids = torch.tensor([seq], device="cuda")
    a = hf(ids).logits[0, prompt_len - 1:-1].float()
    b = model(ids).logits[0, prompt_len - 1:-1].float()
    return {"argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_logit_error": (a - b).abs().max().item(), "max_logit": a.abs().max().item()}


def agreement(a, b):
    """(rows identical, mean length of the common prefix)."""
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n)
    return sum(x == y for x, y in zip(a, b)), sum(prefix) / len(prefix)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default=None, help="comma-separated (default: 1,16,64 for small, else 1,16)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    ap.add_argument("--speculative", action="store_true", help="also time MTP speculation (random weights: "
                                                               "expect ~0 acceptance; use it on trained weights)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode forward (minutes to compile)")
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,16,64" if args.preset == "small" else "1,16")).split(",")]
    over = {"num_hidden_layers": args.layers} if args.layers else {}
    if not args.speculative:
        over["num_nextn_predict_layers"] = 0
    cfg = preset(args.preset, **over)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = DeepSeekV3(cfg).eval()
    torch.set_default_dtype(torch.float32)   # (rope frequencies and the gate bias are made fp32 explicitly)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (max(batches), args.prompt), generator=g).tolist()

    n = count(cfg)
    bw = copy_tb_s()
    latent_bytes, per_head_bytes = cache_bytes_per_token(cfg, 2)
    assert latent_bytes == LatentCache.bytes_per_token(cfg, 2)
    weight_bytes = 2 * n["activated_no_embedding"]
    ctx = args.prompt + args.new // 2   # mean context while decoding
    bound_ms = (weight_bytes + ctx * latent_bytes) / (bw * 1e12) * 1e3
    results = {"env": env(), "preset": args.preset, "config": over, "prompt": args.prompt, "new_tokens": args.new,
               "copy_tb_s": bw, "activated_no_embedding": n["activated_no_embedding"],
               "cache_bytes_per_token": {"nanoseek_latent": latent_bytes, "per_head_kv": per_head_bytes},
               "bound_ms_per_token_batch1": bound_ms,
               "bound_tokens_per_s_batch1": 1e3 / bound_ms, "runs": []}

    hf_out = {}
    if not args.no_hf:
        import transformers
        model.cpu()
        with tempfile.TemporaryDirectory() as d:
            save_hf(model, d)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16,
                                                                    attn_implementation="sdpa").cuda().eval()
        model.cuda()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        for B in batches:
            (toks, cache), s = timed(lambda: run_hf(hf, prompts[:B], args.new))
            hf_out[B] = (toks, s)
            results["cache_bytes_per_token"]["transformers"] = hf_cache_bytes(cache, B)
            del cache
        results["teacher_forced"] = teacher_forced(hf, model, prompts[0] + hf_out[batches[0]][0][0], args.prompt)
        del hf
        gc.collect()
        torch.cuda.empty_cache()

    for spec in [False, True] if args.speculative else [False]:
        for B in batches:
            engine = Engine(model, NoText(), max_batch=B, max_len=args.prompt + args.new, speculative=spec,
                            cuda_graphs=not args.no_cuda_graphs, compile=args.compile)
            run_nanoseek(engine, prompts[:B], args.new)                      # warm-up: captures the graphs
            drafted, accepted = engine.stats["drafted"], engine.stats["accepted"]
            _, prefill_s = timed(lambda: run_nanoseek(engine, prompts[:B], 1))
            toks, s = timed(lambda: run_nanoseek(engine, prompts[:B], args.new))
            row = {"batch": B, "speculative": spec, "tokens_per_s": B * args.new / s, "seconds": s,
                   "decode_ms_per_step": (s - prefill_s) / (args.new - 1) * 1e3}
            if spec:
                row["acceptance"] = (engine.stats["accepted"] - accepted) / max(engine.stats["drafted"] - drafted, 1)
                row["decode_ms_per_step"] = None   # steps yield 1-2 tokens: tokens/s is the measure
            if B in hf_out:
                hf_toks, hf_s = hf_out[B]
                same, prefix = agreement(toks, hf_toks)
                row.update(hf_tokens_per_s=B * args.new / hf_s, speedup=hf_s / s, rows_identical=same,
                           mean_common_prefix=prefix)
            if B == 1 and not spec:
                row["fraction_of_bound"] = bound_ms / row["decode_ms_per_step"]
            results["runs"].append(row)
            del engine
            gc.collect()
            torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}  preset={args.preset}{over or ''}  prompt {args.prompt}  new {args.new}  "
          f"copy {bw:.2f} TB/s  activated {n['activated_no_embedding'] / 1e9:.2f}B")
    cb = results["cache_bytes_per_token"]
    print(f"cache bytes/token: nanoseek latent {cb['nanoseek_latent']:,}, transformers {cb.get('transformers', '-')}, "
          f"per-head K/V {cb['per_head_kv']:,} ({cb['per_head_kv'] / cb['nanoseek_latent']:.1f}x latent)")
    if "teacher_forced" in results:
        tf = results["teacher_forced"]
        print(f"teacher-forced on transformers' output: argmax agreement {tf['argmax_agreement']:.1%}, "
              f"max logit error {tf['max_logit_error']:.3g} (logit range {tf['max_logit']:.3g})")
    print(f"batch-1 bandwidth bound: {bound_ms:.2f} ms/token = {1e3 / bound_ms:.0f} tokens/s")
    print(f"{'batch':>5s} {'spec':>5s} {'nanoseek tok/s':>15s} {'ms/step':>8s} {'HF tok/s':>9s} {'speedup':>8s} "
          f"{'same rows':>10s} {'prefix':>7s} {'of bound':>9s} {'accept':>7s}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in results["runs"]:
        print(f"{r['batch']:5d} {str(r['speculative']):>5s} {r['tokens_per_s']:15.1f} "
              f"{fmt(r['decode_ms_per_step'], '8.2f'):>8s} {fmt(r.get('hf_tokens_per_s'), '9.1f'):>9s} "
              f"{fmt(r.get('speedup'), '7.1f'):>8s} {fmt(r.get('rows_identical'), 'd'):>10s} "
              f"{fmt(r.get('mean_common_prefix'), '7.1f'):>7s} {fmt(r.get('fraction_of_bound'), '9.1%'):>9s} "
              f"{fmt(r.get('acceptance'), '7.1%'):>7s}")
    write_json("decode.json", results)


if __name__ == "__main__":
    main()
