# The PyTorch anchor of `npm run bench -- engine`: the same LLaMA shape, random weights, in
# plain torch (no transformers), forward and a LoRA step (r 8 on q_proj and v_proj, AdamW on
# the LoRA parameters). Prints one JSON line per case. Args: a JSON list of cases.
import json, math, sys, time
import torch
import torch.nn.functional as F

def build(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, m, nh, nkv, v, L = c["hidden"], c["intermediate"], c["heads"], c["kvHeads"], c["vocab"], c["layers"]
    hd = h // nh
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02)
    layers = []
    for _ in range(L):
        layers.append(dict(q=rnd(nh * hd, h), k=rnd(nkv * hd, h), v=rnd(nkv * hd, h), o=rnd(h, nh * hd),
                           gate=rnd(m, h), up=rnd(m, h), down=rnd(h, m), n1=torch.ones(h), n2=torch.ones(h)))
    return dict(embed=rnd(v, h), layers=layers, norm=torch.ones(h), nh=nh, nkv=nkv, hd=hd)

def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

def rot(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)

def forward(M, ids, lora=None, scaling=2.0):
    B, S = ids.shape
    nh, nkv, hd = M["nh"], M["nkv"], M["hd"]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(S).float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()
    mask = torch.full((S, S), float("-inf")).triu(1)
    x = F.embedding(ids, M["embed"])
    for i, p in enumerate(M["layers"]):
        n = rms(x, p["n1"])
        q = F.linear(n, p["q"])
        k = F.linear(n, p["k"])
        v = F.linear(n, p["v"])
        if lora is not None:
            la = lora[i]
            q = q + F.linear(F.linear(n, la["qa"]), la["qb"]) * scaling
            v = v + F.linear(F.linear(n, la["va"]), la["vb"]) * scaling
        q = q.view(B, S, nh, hd).transpose(1, 2)
        k = k.view(B, S, nkv, hd).transpose(1, 2)
        v = v.view(B, S, nkv, hd).transpose(1, 2)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, S, nh * hd), p["o"])
        n = rms(x, p["n2"])
        x = x + F.linear(F.silu(F.linear(n, p["gate"])) * F.linear(n, p["up"]), p["down"])
    return F.linear(rms(x, M["norm"]), M["embed"])

def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]

def run_case(c):
    torch.manual_seed(0)
    M = build(c)
    B, S, reps = c["batch"], c["seq"], c["reps"]
    ids = torch.randint(0, c["vocab"], (B, S))
    with torch.inference_mode():
        forward(M, ids)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); forward(M, ids); ts.append(time.perf_counter() - t0)
    fwd = B * S / median(ts)
    h, nh, nkv, hd = c["hidden"], M["nh"], M["nkv"], M["hd"]
    lora = []
    for _ in M["layers"]:
        lora.append(dict(qa=(torch.randn(8, h) * 0.01).requires_grad_(), qb=torch.zeros(nh * hd, 8).requires_grad_(),
                         va=(torch.randn(8, h) * 0.01).requires_grad_(), vb=torch.zeros(nkv * hd, 8).requires_grad_()))
    params = [t for d in lora for t in d.values()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    def step():
        opt.zero_grad()
        logits = forward(M, ids, lora)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, c["vocab"]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
    step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    return dict(forwardTokensPerSecond=fwd, loraStepTokensPerSecond=B * S / median(ts))

def matmul_gflops():
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    a @ b
    ts = []
    for _ in range(20):
        t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
    return 2 * 1024 * 576 * 1536 / median(ts) / 1e9

if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    threads = int(sys.argv[2])
    torch.set_num_threads(threads)
    print(json.dumps(dict(kind="matmul", gflops=matmul_gflops(), threads=threads, torch=torch.__version__)), flush=True)
    for c in cases:
        r = run_case(c)
        print(json.dumps(dict(kind="case", name=c["name"], batch=c["batch"], seq=c["seq"], threads=threads, **r)), flush=True)
