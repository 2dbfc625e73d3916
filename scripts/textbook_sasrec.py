"""An independent cross-check, not part of the library: a textbook SASRec (Kang & McAuley 2018: item table scaled
by sqrt(D) plus positions, 2 pre-norm blocks with one head, point-wise feed-forward, dropout 0.5, final LayerNorm,
scores = dot product with the input table) trained with full cross-entropy at every position, Adam lr 1e-3, batch
128, on Amazon Beauty's leave-one-out split, with validation and test NDCG@10 computed here from scratch with each
user's history removed from the ranking. It exists to check that the library's `loo` numbers are not behind a
plain implementation on the same file (docs/results/README.md, issue 19). One thread; ~35-55 s per epoch on the
2-core dev VM. Stops 10 epochs after the best validation epoch.

Usage: python scripts/textbook_sasrec.py [D=64] [EPOCHS=200] [LR=1e-3] [FFN_MULT=1] [BEAUTY_TXT]
"""

import sys, time, numpy as np, torch, torch.nn as nn, torch.nn.functional as F

torch.set_num_threads(1)
torch.manual_seed(0)
np.random.seed(0)
D = int(sys.argv[1]) if len(sys.argv) > 1 else 64
EPOCHS = int(sys.argv[2]) if len(sys.argv) > 2 else 60
LR = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-3
FFN = int(sys.argv[4]) if len(sys.argv) > 4 else 1
M = 50
PATH = sys.argv[5] if len(sys.argv) > 5 else "../shared/data/amazon-beauty/Beauty.txt"
seqs = [[int(x) for x in l.split()[1:]] for l in open(PATH)]
N = max(max(s) for s in seqs) + 1


def pad(s):
    s = s[-M:]
    return [0] * (M - len(s)) + s


train_in = torch.tensor([pad(s[:-3]) for s in seqs])
train_tg = torch.tensor([pad(s[1:-2]) for s in seqs])
val_in = torch.tensor([pad(s[:-2]) for s in seqs])
val_tg = torch.tensor([s[-2] for s in seqs])
test_in = torch.tensor([pad(s[:-1]) for s in seqs])
test_tg = torch.tensor([s[-1] for s in seqs])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.att = nn.MultiheadAttention(D, 1, dropout=0.5, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(D, FFN * D), nn.GELU(), nn.Dropout(0.5), nn.Linear(FFN * D, D), nn.Dropout(0.5))
        self.drop = nn.Dropout(0.5)

    def forward(self, x, causal, padm):
        h = self.ln1(x)
        a, _ = self.att(h, h, h, attn_mask=causal, key_padding_mask=padm, need_weights=False)
        x = x + self.drop(a)
        return x + self.ff(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(N, D, padding_idx=0)
        self.pos = nn.Embedding(M, D)
        nn.init.normal_(self.emb.weight, std=D**-0.5)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln = nn.LayerNorm(D)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        T = x.shape[1]
        padm = x == 0
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        h = self.drop(self.emb(x) * D**0.5 + self.pos(torch.arange(T)))
        h = h * (~padm).unsqueeze(-1)
        for b in self.blocks:
            h = b(h, causal, None) * (~padm).unsqueeze(-1)
        return self.ln(h)


model = SASRec()
opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.98))


@torch.no_grad()
def evaluate(inp, tg):
    model.eval()
    nd = []
    for i in range(0, len(inp), 1024):
        x = inp[i : i + 1024]
        h = model(x)[:, -1]
        sc = h @ model.emb.weight.T
        sc[:, 0] = -1e9
        sc.scatter_(1, x, -1e9)  # history removed
        tsc = sc.gather(1, tg[i : i + 1024, None])
        rank = (sc > tsc).sum(1)
        nd.append(torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(())))
    model.train()
    return torch.cat(nd).mean().item()


best, B = (0, -1, 0), 128
for ep in range(EPOCHS):
    t0 = time.time()
    perm = torch.randperm(len(seqs))
    tot = 0
    # length-sorted buckets for CPU speed
    for i in range(0, len(perm), B * 16):
        chunk = perm[i : i + B * 16]
        chunk = chunk[torch.argsort((train_in[chunk] != 0).sum(1))]
        for j in torch.randperm((len(chunk) + B - 1) // B).tolist():
            idx = chunk[j * B : (j + 1) * B]
            L = max(int((train_in[idx] != 0).sum(1).max()), 1)
            x, y = train_in[idx, -L:], train_tg[idx, -L:]
            h = model(x)
            logits = h @ model.emb.weight.T
            loss = F.cross_entropy(logits.reshape(-1, N), y.reshape(-1), ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
    v = evaluate(val_in, val_tg)
    if v > best[0]:
        best = (v, ep, evaluate(test_in, test_tg))
    print(
        f"ep {ep} loss {tot:.0f} val {v:.4f} best {best[0]:.4f}@{best[1]} test@best {best[2]:.4f} {time.time() - t0:.0f}s",
        flush=True,
    )
    if ep - best[1] >= 10:
        break
