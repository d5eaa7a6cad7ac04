"""One whole sampler step as one ONNX model, so a sampling loop makes one session call per step.

``build_step_graph`` wraps an exported noise predictor (inputs ``x`` float32 [B,C,H,W], ``t`` int64 [B],
optional ``y`` int64 [B]; output ``eps`` float32 [B,C,H,W]) into a model that computes, with the six
per-step coefficients ``coef = [A, B, C, D, P, Q]``::

    eps    = model(x_t, t, y)                       # guided: eps_u + w·(eps_c − eps_u), one 2B-batch call
    x0_hat = clip(P·x_t + Q·eps, −1, 1)
    x_next = A·x_t + B·eps + D·x0_hat + C·z

which covers DDPM and DDIM steps with or without x̂₀ clipping. ``StepSession`` runs it from numpy
arrays (``run``) or keeps ``x`` on the device between steps through IOBinding (``run_iobinding``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    import onnxruntime as ort

STEP_GRAPH_KEY = "ddpm_step_graph"  # metadata_props key marking a step model
MIN_OPSET = 13  # Split with a 'split' input, Clip with min/max inputs


def build_step_graph(model: onnx.ModelProto, *, guided: bool = False, null_class: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` extended into one sampler step (``model`` itself is left untouched).

    Inputs: ``x_t`` float32 [B,C,H,W], ``t`` int64 [B], ``y`` int64 [B] (only if ``model`` has ``y``),
    ``z`` float32 [B,C,H,W] (injected noise), ``coef`` float32 [6] = [A, B, C, D, P, Q] and, when
    ``guided``, ``w`` float32 [1] (guidance scale). Output: ``x_next`` float32 [B,C,H,W]. B stays dynamic.
    Guided runs the predictor on 2B images with labels ``concat([y, null_class…])``. The model's own
    values are renamed (``step_model_x`` …) so they cannot clash with these names; every new value and
    node name starts with ``step_``. Metadata props are kept and ``ddpm_step_graph`` = "1" is added.
    Raises ValueError for a model without inputs x and t (and at most y) and one output, an opset
    below 13, or ``guided`` without a ``y`` input or without ``null_class``.
    """
    graph_in = model.graph
    initialized = {i.name for i in graph_in.initializer}
    inputs = {i.name: i for i in graph_in.input if i.name not in initialized}
    if not {"x", "t"} <= set(inputs) or not set(inputs) <= {"x", "t", "y"} or len(graph_in.output) != 1:
        raise ValueError(f"expected a noise predictor with inputs x, t[, y] and one output, got inputs "
                         f"{sorted(inputs)} and {len(graph_in.output)} outputs")
    conditional = "y" in inputs
    if guided and not conditional:
        raise ValueError("classifier-free guidance needs a class-conditional model (one with a 'y' input)")
    if guided and null_class is None:
        raise ValueError("classifier-free guidance needs the null class label (contract.null_class)")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ValueError(f"the step graph needs opset >= {MIN_OPSET}, the model has {opset}")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = _names(g)

    def fresh(base: str) -> str:
        name, i = f"step_{base}", 0
        while name in taken:
            i += 1
            name = f"step_{base}_{i}"
        taken.add(name)
        return name

    # Rename the predictor's inputs and output, and any value that clashes with the step model's interface.
    eps_out = g.output[0].name
    io_names = ["x_t", "t", "y", "z", "coef", "w", "x_next"]
    mapping = {n: fresh(f"model_{n}") for n in [*inputs, eps_out]}
    mapping |= {n: fresh(n) for n in io_names if n in taken and n not in mapping}
    _rename(g, mapping)
    mx, mt, meps = mapping["x"], mapping["t"], mapping[eps_out]
    my = mapping.get("y")

    # The predictor's former inputs and output become internal values (value_info); guided doubles the batch.
    internal = [_value_info(vi.name, vi.type) for vi in [*g.input, *g.output] if vi.name in {mx, mt, my, meps}]
    x_type = next(vi.type for vi in internal if vi.name == mx)
    t_type = next(vi.type for vi in internal if vi.name == mt)
    batch_params = {x_type.tensor_type.shape.dim[0].dim_param} - {""} if x_type.tensor_type.shape.dim else set()
    kept = [vi for vi in g.input if vi.name not in {mx, mt, my}]
    new_inputs = [_value_info("x_t", x_type), _value_info("t", t_type)]
    if conditional:
        new_inputs.append(_value_info("y", next(vi.type for vi in internal if vi.name == my)))
    new_inputs += [_value_info("z", x_type), helper.make_tensor_value_info("coef", TensorProto.FLOAT, [6])]
    if guided:
        new_inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    del g.input[:]
    g.input.extend(new_inputs + kept)
    g.value_info.extend(internal)
    del g.output[:]
    g.output.append(_value_info("x_next", x_type))
    if guided:  # the predictor's batch is 2B now: forget the symbolic batch size inside it
        for vi in g.value_info:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in batch_params:
                    d.ClearField("dim_param")

    def const(base: str, value: Any, dtype: type) -> str:
        name = fresh(base)
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, ins: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [fresh(f"{op.lower()}") for _ in range(n_out)]
        nodes.append(helper.make_node(op, ins, outs, name=fresh(f"{op}_node"), **attrs))
        return outs

    nodes: list[onnx.NodeProto] = []
    if guided:
        nodes.append(helper.make_node("Concat", ["x_t", "x_t"], [mx], name=fresh("Concat_x"), axis=0))
        nodes.append(helper.make_node("Concat", ["t", "t"], [mt], name=fresh("Concat_t"), axis=0))
        (y_null,) = node("Expand", [const("null_class", null_class, np.int64), *node("Shape", ["y"])])
        nodes.append(helper.make_node("Concat", ["y", y_null], [my], name=fresh("Concat_y"), axis=0))
    else:
        for src, dst in [("x_t", mx), ("t", mt)] + ([("y", my)] if conditional else []):
            nodes.append(helper.make_node("Identity", [src], [dst], name=fresh(f"Identity_{src}")))
    pre, nodes = nodes, []

    a, b, c, d, p, q = node("Split", ["coef", const("coef_split", [1] * 6, np.int64)], 6, axis=0)
    eps = meps
    if guided:
        (batch,) = node("Slice", [*node("Shape", ["x_t"]), const("zero", [0], np.int64), const("one", [1], np.int64)])
        eps_c, eps_u = node("Split", [meps, *node("Concat", [batch, batch], axis=0)], 2, axis=0)
        (eps,) = node("Add", [eps_u, *node("Mul", ["w", *node("Sub", [eps_c, eps_u])])])
    (x0_raw,) = node("Add", [*node("Mul", [p, "x_t"]), *node("Mul", [q, eps])])
    (x0_hat,) = node("Clip", [x0_raw, const("clip_min", -1.0, np.float32), const("clip_max", 1.0, np.float32)])
    (acc,) = node("Add", [*node("Mul", [a, "x_t"]), *node("Mul", [b, eps])])
    (acc,) = node("Add", [acc, *node("Mul", [d, x0_hat])])
    nodes.append(helper.make_node("Add", [acc, *node("Mul", [c, "z"])], ["x_next"], name=fresh("Add_x_next")))

    model_nodes = list(g.node)
    del g.node[:]
    g.node.extend(pre + model_nodes + nodes)
    props = [pr for pr in out.metadata_props if pr.key != STEP_GRAPH_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    out.metadata_props.add(key=STEP_GRAPH_KEY, value="1")
    return out


def _value_info(name: str, type_proto: onnx.TypeProto) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto(name=name)
    vi.type.CopyFrom(type_proto)
    return vi


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [s for a in node.attribute for s in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _names(g: onnx.GraphProto) -> set[str]:
    """Every value and node name in ``g`` and its subgraphs."""
    names = {v.name for v in [*g.input, *g.output, *g.value_info, *g.initializer]}
    names |= {s.values.name for s in g.sparse_initializer}
    for n in g.node:
        names |= {*n.input, *n.output, n.name}
        for s in _subgraphs(n):
            names |= _names(s)
    return names - {""}


def _rename(g: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values in place, in ``g`` and its subgraphs (which may refer to outer-scope values)."""
    for v in [*g.input, *g.output, *g.value_info, *g.initializer, *(s.values for s in g.sparse_initializer)]:
        v.name = mapping.get(v.name, v.name)
    for n in g.node:
        n.input[:] = [mapping.get(i, i) for i in n.input]
        n.output[:] = [mapping.get(o, o) for o in n.output]
        for s in _subgraphs(n):
            _rename(s, mapping)


_DTYPES = {"x_t": np.float32, "z": np.float32, "t": np.int64, "y": np.int64}
_ORT_TYPES = {np.float32: "tensor(float)", np.int64: "tensor(int64)"}


class StepSession:
    """An onnxruntime session over a ``build_step_graph`` model.

    ``providers`` are onnxruntime provider names (e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``).
    ``conditional`` / ``guided`` say whether the model takes ``y`` / ``w``.
    """

    def __init__(self, step_model: onnx.ModelProto | bytes, providers: list[str], session_options=None) -> None:
        import onnxruntime as ort

        data = step_model if isinstance(step_model, bytes) else step_model.SerializeToString()
        self.session: ort.InferenceSession = ort.InferenceSession(data, sess_options=session_options,
                                                                  providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.conditional = "y" in self.input_names
        self.guided = "w" in self.input_names

    def _feed(self, t, z, coef, y, w) -> dict[str, Any]:
        """Checked inputs other than x_t: numpy arrays or OrtValues (t, z, y), float32 coef (6,), w (1,)."""
        if (y is None) == self.conditional:
            raise ValueError("labels y are required for a conditional step model" if self.conditional
                             else "this step model takes no labels y")
        if (w is None) == self.guided:
            raise ValueError("the guidance scale w is required for a guided step model" if self.guided
                             else "this step model is not guided: pass no w")
        feed: dict[str, Any] = {"t": t, "z": z}
        if y is not None:
            feed["y"] = y
        for name, value in feed.items():
            _check_dtype(name, value)
        feed["coef"] = np.asarray(coef, dtype=np.float32).reshape(6)
        if w is not None:
            feed["w"] = np.asarray(w, dtype=np.float32).reshape(1)
        return feed

    def run(self, x_t: np.ndarray, t: np.ndarray, z: np.ndarray, coef: np.ndarray,
            y: np.ndarray | None = None, w: float | np.ndarray | None = None) -> np.ndarray:
        """One step on the host: x_t, z float32 (B,C,H,W); t, y int64 (B,); coef (6,) and w (1,) are cast
        to float32. Returns x_next float32 (B,C,H,W). Other dtypes of x_t, z, t, y raise TypeError."""
        _check_dtype("x_t", x_t)
        feed = {"x_t": x_t, **self._feed(t, z, coef, y, w)}
        return self.session.run(["x_next"], feed)[0]

    def run_iobinding(self, x_t: ort.OrtValue, t, z, coef, y=None, w=None, *,
                      device_id: int | None = None) -> ort.OrtValue:
        """One step with x_t an ``OrtValue`` (float32 (B,C,H,W), on any device); returns x_next as an
        OrtValue on the same device, to feed back as the next step's x_t without a host copy.
        t, y (int64 (B,)) and z (float32 (B,C,H,W)) may be numpy arrays or OrtValues. OrtValue has no
        device id accessor: ``device_id`` defaults to the session's first provider's ``device_id`` (or 0)."""
        import onnxruntime as ort

        _check_dtype("x_t", x_t)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x_t", x_t)
        for name, value in self._feed(t, z, coef, y, w).items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        device = x_t.device_name().lower()
        if device_id is None:
            options = self.session.get_provider_options().get(self.session.get_providers()[0], {})
            device_id = 0 if device == "cpu" else int(options.get("device_id", 0))
        binding.bind_output("x_next", device, device_id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


def _check_dtype(name: str, value: Any) -> None:
    want = _DTYPES[name]
    got = value.data_type() if hasattr(value, "data_type") else getattr(value, "dtype", type(value))
    if got != _ORT_TYPES[want] and got != want:
        raise TypeError(f"step input {name!r} must be {np.dtype(want).name}, got {got}")
