"""Recover the torch models inside a bundle's ONNX graph.

A bundle outlives the run folders that trained it: a fresh clone has `models/default/` and no
checkpoint. Recovering its members lets anyone evaluate or probe them one by one, distil from them,
or export one again beside a new member (`melanoma export --model OLD_MEMBER NEW_RUN`).

The exporter folds every BatchNorm into the convolution before it and the head's BatchNorm scale
into one constant, so the graph's weights are not the checkpoint's. The recovered model keeps the
folded weight in each convolution and turns its BatchNorm into an exact bias: running mean 0,
running variance 1 - eps, weight 1. It computes the same function, which `members_from_bundle`
checks against the graph itself before returning anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from melanoma_detector import __version__
from melanoma_detector.errors import DataError, UserError
from melanoma_detector.inference.bundle import Bundle, load_bundle
from melanoma_detector.models.checkpoint import FORMAT_VERSION
from melanoma_detector.models.factory import MelanomaNet, create_model

log = logging.getLogger(__name__)

# Largest |torch - graph| accepted on each output for a random batch, relative to the output's scale.
# fp32 reassociation between the two runtimes gives ~1e-5 on the shipped pair's logit; one wrong
# weight gives differences of order one.
TOLERANCE = 1e-3


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy: ONNX arrays are read-only


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        # The exporter stores equal tensors once and aliases the copies through Identity nodes.
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _conv_bn_pairs(model: MelanomaNet, input_size: int) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every backbone convolution in execution order, with the BatchNorm that reads its output
    directly (the one the exporter folds into it), found by running the model once."""
    order: list[nn.Conv2d] = []
    produced: dict[int, nn.Conv2d] = {}
    bn_of: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    orphans: list[str] = []
    names = {m: n for n, m in model.backbone.named_modules()}

    def on_conv(mod, _inp, out):
        order.append(mod)
        produced[out.data_ptr()] = mod

    def on_bn(mod, inp, _out):
        conv = produced.get(inp[0].data_ptr())
        if conv is None or conv in bn_of:
            orphans.append(names.get(mod, "?"))
        else:
            bn_of[conv] = mod

    hooks = []
    for m in model.backbone.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(on_bn))
    try:
        with torch.no_grad():
            model.eval().forward_features(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    if orphans:
        raise UserError(f"cannot recover this backbone from a graph: BatchNorm {orphans[0]} does not follow a "
                        "convolution; accepted: backbones whose every BatchNorm reads a convolution's output, as in "
                        "timm's EfficientNet family")
    return [(c, bn_of.get(c)) for c in order]


def _load_member(model: MelanomaNet, convs: list, values: dict[str, np.ndarray], head_prefix: str,
                 graph, input_size: int) -> None:
    pairs = _conv_bn_pairs(model, input_size)
    if len(pairs) != len(convs):
        raise UserError(f"the graph holds {len(convs)} convolutions for this member, its backbone "
                        f"{len(pairs)}; the metadata's backbone does not match the graph")
    with torch.no_grad():
        for (conv, bn), node in zip(pairs, convs):
            weight = values.get(node.input[1])
            if weight is None or tuple(weight.shape) != tuple(conv.weight.shape):
                found = "no constant weights" if weight is None else f"weights {tuple(weight.shape)}"
                raise UserError(f"graph convolution {node.name} has {found}, the backbone "
                                f"{tuple(conv.weight.shape)}; the metadata's backbone does not match the graph")
            bias = values[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0], "f4")
            conv.weight.copy_(_tensor(weight))
            if bn is not None:
                bn.weight.fill_(1.0)
                bn.bias.copy_(_tensor(bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif conv.bias is not None:
                conv.bias.copy_(_tensor(bias))
            elif np.any(bias):
                raise UserError(f"graph convolution {node.name} has a bias its backbone layer lacks")
        head = model.head
        for layer, p in [(lay, p) for lay in ("fc1", "fc2", "out") for p in ("weight", "bias")] + \
                [("norm", "bias"), ("norm", "running_mean")]:
            _set(getattr(getattr(head, layer), p), values.get(f"{head_prefix}head.{layer}.{p}"), f"head.{layer}.{p}")
        _set(head.norm.weight, _head_scale(graph, values, head_prefix), "head.norm scale")
        head.norm.running_var.fill_(1.0 - head.norm.eps)


def _set(target: torch.Tensor, value: np.ndarray | None, what: str) -> None:
    if value is None or tuple(value.shape) != tuple(target.shape):
        found = "nothing" if value is None else f"shape {tuple(value.shape)}"
        raise UserError(f"the graph has {found} for {what}, the metadata's model {tuple(target.shape)}; the "
                        "metadata does not describe the graph (accepted: bundles written by `melanoma export`)")
    target.copy_(_tensor(value))


def _head_scale(graph, values: dict[str, np.ndarray], head_prefix: str) -> np.ndarray:
    """The exporter's constant `norm.weight / sqrt(running_var + eps)`: the factor multiplying the
    centred pooled features (ExportWrapper.forward)."""
    mean = f"{head_prefix}head.norm.running_mean"
    centred = next((n.output[0] for n in graph.node if n.op_type == "Sub" and mean in n.input), None)
    for node in graph.node:
        if node.op_type == "Mul" and centred in node.input:
            other = next(i for i in node.input if i != centred)
            if other in values:
                return values[other]
    raise UserError(f"the graph has no head scale for {head_prefix or 'its model'}; not a graph written by "
                    "`melanoma export`")


def _members_info(meta: dict[str, Any]) -> list[dict[str, Any]]:
    training = meta.get("training") or {}
    members = training.get("members")
    if members:
        return members
    if "config" not in training:
        raise UserError("the bundle's metadata.json records no training config; accepted: bundles written by "
                        "`melanoma export`")
    return [{"backbone": training["config"]["model"]["backbone"], "config": training["config"],
             "best": training.get("best")}]


def members_from_bundle(path: str | Path | Bundle | None = None) -> list[tuple[MelanomaNet, dict[str, Any]]]:
    """The bundle's models as (torch model in eval mode, checkpoint dict), first member first.

    Raises UserError when the recovered models do not reproduce the graph's outputs."""
    import onnx

    bundle = path if isinstance(path, Bundle) else load_bundle(path)
    meta = bundle.metadata
    infos = _members_info(meta)
    size = int(meta["preprocessing"]["input_size"])
    graph = onnx.load(str(bundle.graph_path)).graph
    values = _constants(graph)
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    ensemble = len(infos) > 1
    out: list[tuple[MelanomaNet, dict[str, Any]]] = []
    for i, info in enumerate(infos):
        mcfg = info["config"]["model"]
        model = create_model(info["backbone"], pretrained=False, hidden=tuple(mcfg["hidden"]),
                             dropout=tuple(mcfg["dropout"]))
        convs = [n for n in conv_nodes if n.name.startswith(f"/members.{i}/")] if ensemble else conv_nodes
        _load_member(model, convs, values, f"members.{i}.model." if ensemble else "model.", graph, size)
        model.eval()
        ckpt: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "backbone": info["backbone"],
            "config": info["config"],
            "class_names": list(meta["class_names"]),
            "preprocessing": dict(meta["preprocessing"]),
            "best": info.get("best"),
            "source_bundle": {"model_version": bundle.version, "graph_sha256": meta["graph"].get("sha256"),
                              "member": i, "of": len(infos)},
        }
        if not ensemble:  # one model: the bundle's calibration is its own
            ckpt.update(temperature=bundle.temperature, logit_bias=bundle.logit_bias, thresholds=bundle.thresholds)
        out.append((model, ckpt))
    _check_against_graph([m for m, _ in out], [c for _, c in out], bundle.graph_path, size)
    return out


def _check_against_graph(models: list[MelanomaNet], ckpts: list[dict], graph_path: Path, size: int) -> None:
    import onnxruntime as ort

    from melanoma_detector.export.onnx_export import OUTPUT_NAMES, EnsembleWrapper, ExportWrapper, gate_fraction_of

    wrappers = [ExportWrapper(m, gate_fraction=gate_fraction_of(c)) for m, c in zip(models, ckpts)]
    wrapper = wrappers[0] if len(wrappers) == 1 else EnsembleWrapper(wrappers)
    x = _tensor(np.random.default_rng(0).normal(size=(2, 3, size, size)))
    with torch.no_grad():
        expected = [t.numpy() for t in wrapper.eval()(x)]
    sess = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))
    for name, want in zip(OUTPUT_NAMES, expected):
        worst = float(np.max(np.abs(got[name] - want))) if got[name].shape == want.shape else np.inf
        # Relative to the output's scale: feature maps reach tens where the logit stays near one.
        if not worst <= TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
            raise UserError(f"the recovered models differ from the graph by {worst:.3g} in {name}; the bundle's "
                            "metadata does not describe its graph (accepted: bundles written by `melanoma export`, "
                            "unmodified)")
    log.info("recovered %d model(s); max |logit difference| against the graph %.2e", len(models),
             float(np.max(np.abs(got["logit"] - expected[0]))))


def write_member_checkpoints(path: str | Path | None, out_dir: str | Path, *,
                             split_file: str | Path | None = None,
                             data_paths: list[str] | None = None) -> list[Path]:
    """`members_from_bundle`, each written as OUT/member-I/checkpoint.pt (OUT/checkpoint.pt for a single
    model), with the split beside each as split.csv, as in a run folder, so export and evaluation find
    the same split. `split_file` (default: the split file the bundle records, when it is at hand) may be
    a run's split.csv or a keys-only --split-file; the latter's images are looked up in `data_paths`
    (default: the folders the bundle's models trained on), and a key not found there is refused.

    A split.csv says which images its model trained on (export's leakage checks and the train_keys_sha256 it
    records read it), so it is written only when the bundle records that every member trained on exactly that
    split's train images (training.train_keys_sha256); otherwise no split.csv is written, with a warning."""
    from melanoma_detector.config import training_data_paths
    from melanoma_detector.data.splits import read_split_rows, split_csv_fingerprint, write_split_rows
    from melanoma_detector.export.bundle import refuse_file_on_the_way
    from melanoma_detector.models.checkpoint import save_checkpoint
    from melanoma_detector.models.factory import serving_state

    out = Path(out_dir)
    accepted = "a new folder, or one that holds no checkpoint"
    refuse_file_on_the_way(out, accepted)
    bundle = load_bundle(path)
    info = _members_info(bundle.metadata)
    folders = [out] if len(info) == 1 else [out / f"member-{i}" for i in range(len(info))]
    for f in folders:
        refuse_file_on_the_way(f, accepted)
    taken = [f / "checkpoint.pt" for f in folders if (f / "checkpoint.pt").exists()]
    if taken:  # never overwrite a trained model
        raise UserError(f"{taken[0]} already exists; accepted: an --out folder that holds no checkpoint")
    recorded = Path((bundle.metadata.get("splits") or {}).get("file", ""))
    trained_on = (bundle.metadata.get("training") or {}).get("train_keys_sha256")
    source = Path(split_file) if split_file else recorded if recorded.name and recorded.is_file() else None
    if split_file and not source.is_file():
        read_split_rows(source)  # refused: not found
    if source is not None and (trained_on is None or split_csv_fingerprint(source) != trained_on):
        log.warning("%s: the bundle does not record that %s trained on its train images (%s); no split.csv "
                    "written beside the checkpoints (give export --split to calibrate or probe them)", source,
                    "its model" if len(info) == 1 else "every member",
                    "its members trained on different or unrecorded splits" if trained_on is None else
                    "training.train_keys_sha256 differs")
        source = None
    rows = None
    if data_paths is None:
        data_paths = training_data_paths(info[0]["config"])
    if source is not None and split_file:
        rows = read_split_rows(split_file, data_paths=data_paths)
    elif source is not None:
        try:  # a default the user did not ask for: without its images, the checkpoints go without it
            rows = read_split_rows(recorded, data_paths=data_paths)
        except DataError as e:
            log.warning("%s; no split.csv written", e)
    members = members_from_bundle(bundle)
    written = []
    for folder, (model, ckpt) in zip(folders, members):
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint({**ckpt, "model_state": serving_state(model.state_dict())}, folder / "checkpoint.pt")
        if rows is not None and not (folder / "split.csv").exists():
            write_split_rows(rows, folder / "split.csv")
        written.append(folder / "checkpoint.pt")
    return written
