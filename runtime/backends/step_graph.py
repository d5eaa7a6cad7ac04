"""One whole sampler step as one ONNX model, so a sampling loop makes one session call per step.

``build_step_graph`` wraps an exported noise predictor (inputs ``x`` float32 [B,C,H,W], ``t`` int64 [B],
optional ``y`` int64 [B]; output ``eps`` float32 [B,C,H,W]) into a model that computes, with one row ``coef`` of a
step table (``runtime.sampling.table``: its 7 columns, then H history coefficients) and the H earlier d's ``h1`` …::

    eps    = model(x_t, t, y)                       # guided: eps_u + w·(eps_c − eps_u), one 2B-batch call
    d      = clip(d_from_x·x_t + d_from_eps·eps, −d_clip, d_clip)
    x_next = x_coef·x_t + eps_coef·eps + d_coef·d + h1_coef·h1 + … + hH_coef·hH + noise_coef·z

the arithmetic of ``runtime.sampling.step.step``, for every sampler (``d`` is an output where H > 0: the next step's
``h1``; the caller shifts the rest). ``runtime.backends.fused`` runs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.sampling.table import COLUMNS, history_columns

MIN_OPSET = 14  # the oldest opset ddpm-export writes and the runtime runs (the step graph needs 13+)


def build_step_graph(model: onnx.ModelProto, *, null_class: int | None = None, history: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` extended into one sampler step (``model`` itself is left untouched).

    Inputs: ``x_t`` float32 [B,C,H,W], ``t`` int64 [B], ``y`` int64 [B] (only if ``model`` has ``y``),
    ``z`` float32 [B,C,H,W] (injected noise), ``h1`` … ``hH`` float32 [B,C,H,W] (the d of the ``history`` steps
    before, newest first; zeros before they exist), ``coef`` float32 [7 + H] (``table.COLUMNS``, then the history
    coefficients) and, for a guided step (``null_class`` given), ``w`` float32 [1] (guidance scale). Outputs:
    ``x_next`` and, where H > 0, ``d``, float32 [B,C,H,W].
    B stays dynamic. Guided runs the predictor on 2B images with labels ``concat([y, null_class…])``. The
    model's own values are renamed (``step_model_x`` …) so they cannot clash with these names; every new value
    and node name starts with ``step_``. Metadata props are kept. Raises ValueError for a model without inputs
    x and t (and at most y) and one output, an opset below ``MIN_OPSET``, or ``null_class`` without a ``y`` input.
    """
    graph_in = model.graph
    initialized = {i.name for i in graph_in.initializer}
    inputs = {i.name: i for i in graph_in.input if i.name not in initialized}
    if not {"x", "t"} <= set(inputs) or not set(inputs) <= {"x", "t", "y"} or len(graph_in.output) != 1:
        raise ValueError(f"expected a noise predictor with inputs x, t[, y] and one output, got inputs "
                         f"{sorted(inputs)} and {len(graph_in.output)} outputs")
    conditional, guided = "y" in inputs, null_class is not None
    if guided and not conditional:
        raise ValueError("classifier-free guidance needs a class-conditional model (one with a 'y' input)")
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
    slots = [f"h{j + 1}" for j in range(history)]
    io_names = ["x_t", "t", "y", "z", *slots, "coef", "w", "x_next", "d"]
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
    width = len(COLUMNS) + history
    new_inputs += [_value_info("z", x_type), *(_value_info(h, x_type) for h in slots),
                   helper.make_tensor_value_info("coef", TensorProto.FLOAT, [width])]
    if guided:
        new_inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    del g.input[:]
    g.input.extend(new_inputs + kept)
    g.value_info.extend(internal)
    del g.output[:]
    g.output.extend([_value_info("x_next", x_type)] + ([_value_info("d", x_type)] if history else []))
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

    names = COLUMNS + history_columns(history)
    c = dict(zip(names, node("Split", ["coef", const("coef_split", [1] * width, np.int64)], width, axis=0)))
    eps = meps
    if guided:
        (batch,) = node("Slice", [*node("Shape", ["x_t"]), const("zero", [0], np.int64), const("one", [1], np.int64)])
        eps_c, eps_u = node("Split", [meps, *node("Concat", [batch, batch], axis=0)], 2, axis=0)
        (eps,) = node("Add", [eps_u, *node("Mul", ["w", *node("Sub", [eps_c, eps_u])])])
    d = "d" if history else fresh("d")
    (d_raw,) = node("Add", [*node("Mul", [c["d_from_x"], "x_t"]), *node("Mul", [c["d_from_eps"], eps])])
    (bound,) = node("Reshape", [c["d_clip"], const("scalar_shape", np.zeros(0), np.int64)])  # Clip takes scalars
    nodes.append(helper.make_node("Clip", [d_raw, *node("Neg", [bound]), bound], [d], name=fresh("Clip_d")))
    (acc,) = node("Add", [*node("Mul", [c["x_coef"], "x_t"]), *node("Mul", [c["eps_coef"], eps])])
    (acc,) = node("Add", [acc, *node("Mul", [c["d_coef"], d])])
    for j, h in enumerate(slots):
        (acc,) = node("Add", [acc, *node("Mul", [c[f"h{j + 1}_coef"], h])])
    nodes.append(helper.make_node("Add", [acc, *node("Mul", [c["noise_coef"], "z"])], ["x_next"],
                                  name=fresh("Add_x_next")))

    model_nodes = list(g.node)
    del g.node[:]
    g.node.extend(pre + model_nodes + nodes)
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
