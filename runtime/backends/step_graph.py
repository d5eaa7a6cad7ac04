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

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.sampling.table import COLUMNS, history_columns

MIN_OPSET = 14  # the oldest opset ddpm-export writes and the runtime runs (the step graph needs 13+)


def build_step_graph(model: onnx.ModelProto, *, null_class: int | None = None, history: int = 0,
                     prediction_channels: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` extended into one sampler step (``model`` itself is left untouched).

    Inputs: ``x_t`` float32 [B,C,H,W], ``t`` int64 [B], ``y`` int64 [B] (only if ``model`` has ``y``),
    ``z`` float32 [B,C,H,W] (injected noise), ``h1`` … ``hH`` float32 [B,C,H,W] (the d of the ``history`` steps
    before, newest first; zeros before they exist), ``coef`` float32 [7 + H] (``table.COLUMNS``, then the history
    coefficients) and, for a guided step (``null_class`` given), ``w`` float32 [1] (guidance scale). Outputs:
    ``x_next`` and, where H > 0, ``d``, float32 [B,C,H,W].
    B stays dynamic. Guided runs the predictor on 2B images with labels ``concat([y, null_class…])``.
    ``prediction_channels``: the predictor's output has more channels, of which the first this many are eps. The
    model's own values are renamed (``step_model_x`` …) so they cannot clash with these names; every new value
    and node name starts with ``step_``. Metadata props are kept. Raises ValueError for a model without inputs
    x and t (and at most y) and one output, an opset below ``MIN_OPSET``, or ``null_class`` without a ``y`` input.
    """
    inputs = _predictor_inputs(model, null_class)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    b = _Builder(out.graph)
    predictor = _rewire(b, inputs, history, guided=null_class is not None)
    feed = _feed_predictor(b, predictor, null_class)
    step = _step(b, predictor, history, guided=null_class is not None, prediction_channels=prediction_channels)
    model_nodes = list(b.g.node)
    del b.g.node[:]
    b.g.node.extend(feed + model_nodes + step)
    return out


def _predictor_inputs(model: onnx.ModelProto, null_class: int | None) -> list[str]:
    """The names of ``model``'s graph inputs that are not initializers, once it is checked to be a noise predictor
    that this step graph can wrap (see ``build_step_graph``'s ValueError)."""
    graph = model.graph
    initialized = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initialized]
    if not {"x", "t"} <= set(inputs) or not set(inputs) <= {"x", "t", "y"} or len(graph.output) != 1:
        raise ValueError(f"expected a noise predictor with inputs x, t[, y] and one output, got inputs "
                         f"{sorted(inputs)} and {len(graph.output)} outputs")
    if null_class is not None and "y" not in inputs:
        raise ValueError("classifier-free guidance needs a class-conditional model (one with a 'y' input)")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ValueError(f"the step graph needs opset >= {MIN_OPSET}, the model has {opset}")
    return inputs


class _Builder:
    """New values, constants and nodes in graph ``g``, each under a fresh ``step_`` name."""

    def __init__(self, g: onnx.GraphProto) -> None:
        self.g, self.taken, self.nodes = g, _names(g), []

    def fresh(self, base: str) -> str:
        name, i = f"step_{base}", 0
        while name in self.taken:
            i += 1
            name = f"step_{base}_{i}"
        self.taken.add(name)
        return name

    def const(self, base: str, value: Any, dtype: type) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, ins: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
        """A node of ``op`` with fresh outputs (returned)."""
        outs = [self.fresh(f"{op.lower()}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=self.fresh(f"{op}_node"), **attrs))
        return outs

    def into(self, op: str, ins: list[str], out: str, name: str, **attrs: Any) -> None:
        """A node of ``op`` writing the given value ``out``."""
        self.nodes.append(helper.make_node(op, ins, [out], name=self.fresh(name), **attrs))

    def take(self) -> list[onnx.NodeProto]:
        """The nodes made since the last ``take``."""
        nodes, self.nodes = self.nodes, []
        return nodes


@dataclass(frozen=True)
class _Predictor:
    """The wrapped predictor's former interface, renamed: its x, t, y (None: unconditional) and ε values."""

    x: str
    t: str
    y: str | None
    eps: str


def _rewire(b: _Builder, inputs: list[str], history: int, guided: bool) -> _Predictor:
    """Rename the predictor's inputs and output (and any value that clashes with the step's interface), make them
    internal values, and give the graph the step's inputs and outputs."""
    g = b.g
    eps_out = g.output[0].name
    slots = [f"h{j + 1}" for j in range(history)]
    io_names = ["x_t", "t", "y", "z", *slots, "coef", "w", "x_next", "d"]
    mapping = {n: b.fresh(f"model_{n}") for n in [*inputs, eps_out]}
    mapping |= {n: b.fresh(n) for n in io_names if n in b.taken and n not in mapping}
    _rename(g, mapping)
    p = _Predictor(mapping["x"], mapping["t"], mapping.get("y"), mapping[eps_out])

    # The predictor's former inputs and output become internal values (value_info); guided doubles the batch.
    internal = [_value_info(vi.name, vi.type) for vi in [*g.input, *g.output] if vi.name in {p.x, p.t, p.y, p.eps}]
    x_type = next(vi.type for vi in internal if vi.name == p.x)
    t_type = next(vi.type for vi in internal if vi.name == p.t)
    batch_params = {x_type.tensor_type.shape.dim[0].dim_param} - {""} if x_type.tensor_type.shape.dim else set()
    kept = [vi for vi in g.input if vi.name not in {p.x, p.t, p.y}]
    new_inputs = [_value_info("x_t", x_type), _value_info("t", t_type)]
    if p.y is not None:
        new_inputs.append(_value_info("y", next(vi.type for vi in internal if vi.name == p.y)))
    new_inputs += [_value_info("z", x_type), *(_value_info(h, x_type) for h in slots),
                   helper.make_tensor_value_info("coef", TensorProto.FLOAT, [len(COLUMNS) + history])]
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
    return p


def _feed_predictor(b: _Builder, p: _Predictor, null_class: int | None) -> list[onnx.NodeProto]:
    """The nodes that feed the predictor from the step's inputs: as they are, or doubled with the null class."""
    if null_class is not None:
        b.into("Concat", ["x_t", "x_t"], p.x, "Concat_x", axis=0)
        b.into("Concat", ["t", "t"], p.t, "Concat_t", axis=0)
        (y_null,) = b.node("Expand", [b.const("null_class", null_class, np.int64), *b.node("Shape", ["y"])])
        b.into("Concat", ["y", y_null], p.y, "Concat_y", axis=0)
    else:
        for src, dst in [("x_t", p.x), ("t", p.t)] + ([("y", p.y)] if p.y is not None else []):
            b.into("Identity", [src], dst, f"Identity_{src}")
    return b.take()


def _step(b: _Builder, p: _Predictor, history: int, guided: bool,
          prediction_channels: int | None = None) -> list[onnx.NodeProto]:
    """The nodes after the predictor: its prediction channels, guidance, then ``runtime.sampling.step.step``'s
    arithmetic."""
    width = len(COLUMNS) + history
    names = COLUMNS + history_columns(history)
    c = dict(zip(names, b.node("Split", ["coef", b.const("coef_split", [1] * width, np.int64)], width, axis=0)))
    eps = p.eps
    if prediction_channels is not None:
        (eps,) = b.node("Slice", [p.eps, b.const("channels_start", [0], np.int64),
                                  b.const("channels_end", [prediction_channels], np.int64),
                                  b.const("channels_axis", [1], np.int64)])
    if guided:
        (batch,) = b.node("Slice", [*b.node("Shape", ["x_t"]), b.const("zero", [0], np.int64),
                                    b.const("one", [1], np.int64)])
        eps_c, eps_u = b.node("Split", [eps, *b.node("Concat", [batch, batch], axis=0)], 2, axis=0)
        (eps,) = b.node("Add", [eps_u, *b.node("Mul", ["w", *b.node("Sub", [eps_c, eps_u])])])
    d = "d" if history else b.fresh("d")
    (d_raw,) = b.node("Add", [*b.node("Mul", [c["d_from_x"], "x_t"]), *b.node("Mul", [c["d_from_eps"], eps])])
    (bound,) = b.node("Reshape", [c["d_clip"], b.const("scalar_shape", np.zeros(0), np.int64)])  # Clip: scalars
    b.nodes.append(helper.make_node("Clip", [d_raw, *b.node("Neg", [bound]), bound], [d], name=b.fresh("Clip_d")))
    (acc,) = b.node("Add", [*b.node("Mul", [c["x_coef"], "x_t"]), *b.node("Mul", [c["eps_coef"], eps])])
    (acc,) = b.node("Add", [acc, *b.node("Mul", [c["d_coef"], d])])
    for j in range(history):
        (acc,) = b.node("Add", [acc, *b.node("Mul", [c[f"h{j + 1}_coef"], f"h{j + 1}"])])
    b.into("Add", [acc, *b.node("Mul", [c["noise_coef"], "z"])], "x_next", "Add_x_next")
    return b.take()


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
