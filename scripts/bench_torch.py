"""PyTorch reference timing for `cargo xtask bench forward` (same model, shapes and protocol).

A plain PyTorch f32 LLaMA forward over the default model's GGUF weights (dequantised with the
`gguf` package), scaled_dot_product_attention with is_causal, tied LM head. It first checks the
100-token paragraph loss against the golden fixture, so the timed model is the real one.

Usage (in a scratch venv with torch, numpy and gguf):
    python scripts/bench_torch.py ~/.cache/lopper/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --threads 2 --shapes 8x128,1x2048 --runs 5 --warmup 1 [--dtype bf16|f16] [--json]

`cargo xtask bench forward --vs-torch PYTHON` runs it with --json in alternating rounds.

With --backward it times what lopper's gradient methods run instead: the mean next-token
cross-entropy of the batch and its gradient with respect to every decoder linear weight (the
rest frozen), in passes of --chunk windows whose losses are weighted by their share of the batch.
"""
import argparse, json, os, statistics, time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize


def load(path):
    r = GGUFReader(path)
    meta = {f.name: f for f in r.fields.values()}

    def scalar(k):
        f = meta[k]
        return f.parts[f.data[0]].item()

    n_layers = scalar("llama.block_count")
    n_head = scalar("llama.attention.head_count")
    n_kv = scalar("llama.attention.head_count_kv")
    eps = scalar("llama.attention.layer_norm_rms_epsilon")
    theta = scalar("llama.rope.freq_base")
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        w[t.name] = torch.from_numpy(a.reshape(shape).copy())

    def unpermute(x, h):
        out, inp = x.shape
        return x.reshape(h, out // h // 2, 2, inp).transpose(1, 2).reshape(out, inp)

    for i in range(n_layers):
        w[f"blk.{i}.attn_q.weight"] = unpermute(w[f"blk.{i}.attn_q.weight"], n_head)
        w[f"blk.{i}.attn_k.weight"] = unpermute(w[f"blk.{i}.attn_k.weight"], n_kv)
    return w, n_layers, n_head, n_kv, eps, theta


def forward(ids, w, n_layers, n_head, n_kv, eps, theta):
    b, s = ids.shape
    x = w["token_embd.weight"][ids]
    d = x.shape[-1]
    hd = d // n_head
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    for i in range(n_layers):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "attn_q.weight"].T).view(b, s, n_head, hd).transpose(1, 2)
        k = (h @ w[p + "attn_k.weight"].T).view(b, s, n_kv, hd).transpose(1, 2)
        v = (h @ w[p + "attn_v.weight"].T).view(b, s, n_kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = n_head // n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(b, s, d) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g = F.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + g @ w[p + "ffn_down.weight"].T
    x = norm(x, w["output_norm.weight"])
    return x @ w["token_embd.weight"].T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="8x128,1x2048")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of median seconds")
    ap.add_argument("--backward", action="store_true", help="time loss + backward to the decoder linears")
    ap.add_argument("--chunk", type=int, default=2, help="windows per backward pass")
    ap.add_argument("--golden", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_golden.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    args = load(a.gguf)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    args = ({k: v.to(dtype) for k, v in args[0].items()},) + args[1:]
    g = json.load(open(a.golden))
    ids = torch.tensor([g["tokenization"]["texts"]["paragraph"]["ids_canonical_digit_split"]])
    with torch.inference_mode():
        logits = forward(ids, *args)
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
    print(f"torch {torch.__version__}, {a.dtype}, {torch.get_num_threads()} threads; paragraph loss {loss:.5f} "
          f"(golden {g['paragraph_forward']['mean_ce_loss_f64_from_f32_logits']:.5f})")
    medians = []
    print("| batch x seq | seconds | tokens/s |")
    print("|---|---:|---:|")
    for shp in a.shapes.split(","):
        b, s = map(int, shp.split("x"))
        x = torch.tensor([[(i * 7919 + t * 104729) % 49152 for t in range(s)] for i in range(b)])
        times = []
        if a.backward:
            w = args[0]
            linears = [k for k in w if k.startswith("blk.") and any(
                n in k for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))]
            for k in linears:
                w[k].requires_grad_(True)
            for r in range(a.warmup + a.runs):
                for k in linears:
                    w[k].grad = None
                t0 = time.perf_counter()
                for c in range(0, b, a.chunk):
                    xc = x[c:c + a.chunk]
                    logits = forward(xc, *args)
                    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                         xc[:, 1:].reshape(-1))
                    (ce * (xc.shape[0] / b)).backward()
                if r >= a.warmup:
                    times.append(time.perf_counter() - t0)
            for k in linears:
                w[k].requires_grad_(False)
                w[k].grad = None
        else:
            with torch.inference_mode():
                for r in range(a.warmup + a.runs):
                    t0 = time.perf_counter()
                    forward(x, *args)
                    if r >= a.warmup:
                        times.append(time.perf_counter() - t0)
        m = statistics.median(times)
        medians.append(m)
        print(f"| {b} x {s} | {m:.3f} | {b * s / m:.0f} |")
    if a.json:
        print(json.dumps({"torch": torch.__version__, "dtype": a.dtype, "loss": loss, "backward": a.backward,
                          "seconds": medians}))


if __name__ == "__main__":
    main()
