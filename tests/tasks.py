"""Small tasks for the tests: entry points as a user would write them (`tests.tasks:tiny`)."""

from __future__ import annotations

import torch

from search.core.data import Split
from search.core.task import Task
from search.tasks.digits import digits


def tiny(width: int = 64) -> Task:
    """The default digits task with a narrow head: trains in seconds."""
    return digits(width=width, epochs=2)


def nan_data() -> Task:
    """Like `tiny`, but its fine-tuning data holds NaN: every fine-tune fails, on purpose."""
    task = tiny()
    (x,), y = task.train.tensors
    x = x.clone()
    x[:, 0, 0, 0] = float("nan")
    task.train = Split((x, y), "train")
    return task


def not_a_task() -> int:
    return 42


def make_input(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, 1, 16, 16)


# --- general tasks: integer token inputs with a mask, DataLoaders, dict outputs, a loss -------

class SelfAttention(torch.nn.Module):
    """Hugging Face's layout: separate q/k/v Linears and a head count attribute."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.head_dim = heads, dim // heads
        self.query = torch.nn.Linear(dim, dim)
        self.key = torch.nn.Linear(dim, dim)
        self.value = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_attention_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e4
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, t, -1)


class TinyEncoder(torch.nn.Module):
    """A one-block BERT-style encoder: forward(input_ids, attention_mask) -> logits, or a dict
    {"logits", "pooled"} when `as_dict`."""

    def __init__(self, vocab: int = 40, dim: int = 32, heads: int = 4, ff: int = 64,
                 as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.embed = torch.nn.Embedding(vocab, dim)
        self.attention = SelfAttention(dim, heads)
        self.output = torch.nn.Linear(dim, dim)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.intermediate = torch.nn.Linear(dim, ff)
        self.out_ff = torch.nn.Linear(ff, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.classifier = torch.nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x = self.embed(input_ids)
        x = self.norm1(x + self.output(self.attention(x, attention_mask)))
        x = self.norm2(x + self.out_ff(torch.relu(self.intermediate(x))))
        m = attention_mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.classifier(pooled)
        return {"logits": logits, "pooled": pooled} if self.as_dict else logits


def token_data(n: int, seed: int, seq: int = 12, vocab: int = 40):
    """Label 1 when token 7 occurs in the unpadded part; lengths vary, padding is 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    lengths = torch.randint(4, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ((ids == 7) & (mask == 1)).any(dim=1).long()
    return (ids, mask), labels


def _train_encoder(model: torch.nn.Module, data, steps: int = 150) -> torch.nn.Module:
    from search.core.data import select

    torch.manual_seed(0)
    (ids, mask), y = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        out = select(model(ids[idx], mask[idx]), None)
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def encoder(as_dict: bool = False) -> Task:
    """Two integer inputs (token ids, attention mask); optionally a dict output."""
    torch.manual_seed(0)
    train = token_data(512, 1)
    model = _train_encoder(TinyEncoder(as_dict=as_dict), train)
    val, test = token_data(128, 2), token_data(128, 3)
    example = (val[0][0][:1], val[0][1][:1])
    return Task("tiny-encoder" + ("-dict" if as_dict else ""), model, train, val, example,
                test=test, output="logits" if as_dict else None)


def dict_encoder() -> Task:
    return encoder(as_dict=True)


def loader_task() -> Task:
    """The tiny digits task fed by torch DataLoaders (shuffled train), nothing held as tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    base = tiny()

    def loader(split, shuffle: bool) -> DataLoader:
        (x,), y = split.tensors
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle)

    return Task("digits-loader", base.model, loader(base.train, True),
                loader(base.val, False), base.example, test=loader(base.test, False))


LOSS_CALLS = {"n": 0}


def smoothed_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A custom loss (label smoothing) that counts its calls, so a test can see it used."""
    LOSS_CALLS["n"] += 1
    return torch.nn.functional.cross_entropy(outputs, labels, label_smoothing=0.1)


def custom_loss_task() -> Task:
    task = tiny()
    task.loss = smoothed_loss
    return task
