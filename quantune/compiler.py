"""torch.compile for models with quantized layers.

Under ``torch.compile`` every :class:`~quantune.qlinear.QuantLinear` is one custom op,
``quantune::linear`` (no graph break). Each such op prepares its own input for the GEMV (cast,
reorder, 16-bit rounding, kashin's DCT), because the eager path's sharing cache cannot be trusted
with compiled code's reused buffers. :func:`compile_model` adds :class:`ShareInputs`, an inductor
pass that merges the ops reading one tensor (q/k/v, gate/up) into one ``quantune::linear_shared``
call that prepares the input once; with the layers' codes stored back to back
(:func:`quantune.qlinear.colocate_siblings`, which compile_model runs first) that call is one GEMV
launch for q/k/v and one for gate/up.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

import quantune.qlinear  # noqa: F401  (registers the custom ops)

_ARGS = ("x", "codes", "bias", "handle", "out_features")


def _args(node: torch.fx.Node) -> dict:
    return {**dict(zip(_ARGS, node.args)), **node.kwargs}


class ShareInputs(CustomGraphPass):
    """Post-grad FX pass: ``quantune::linear`` nodes with the same input node become one
    ``quantune::linear_shared`` node (placed where the first of them was) and one getitem each.
    ``groups``: how many merged groups the last graph had (for reports and tests)."""

    def __init__(self):
        self.groups = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        single = torch.ops.quantune.linear.default
        order = {node: i for i, node in enumerate(graph.nodes)}
        by_input = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_function" and node.target is single:
                by_input[_args(node)["x"]].append(node)
        self.groups = 0
        for x, nodes in by_input.items():
            if len(nodes) < 2:
                continue
            first = nodes[0]
            args = [_args(n) for n in nodes]
            inputs = [a[k] for a in args for k in ("codes", "bias") if isinstance(a[k], torch.fx.Node)]
            if any(order[i] > order[first] for i in inputs):  # an operand made after the first layer: leave as is
                continue
            with graph.inserting_before(first):
                shared = graph.call_function(torch.ops.quantune.linear_shared.default, (
                    x, [a["codes"] for a in args], [a["bias"] for a in args], [a["handle"] for a in args],
                    [a["out_features"] for a in args]))
                shared.meta["val"] = [n.meta.get("val") for n in nodes]
                for i, n in enumerate(nodes):
                    item = graph.call_function(operator.getitem, (shared, i))
                    item.meta.update(n.meta)
                    n.replace_all_uses_with(item)
            for n in nodes:
                graph.erase_node(n)
            self.groups += 1

    def uuid(self):
        return get_hash_for_files((__file__,))


SHARE_INPUTS = ShareInputs()


def compile_model(model, *, mode: str | None = None, options: dict | None = None, share_inputs: bool = True,
                  **kwargs):
    """``torch.compile(model, ...)`` with :class:`ShareInputs` (inductor backend). ``mode`` is turned
    into its inductor options (torch.compile takes either a mode or options, and the pass is an
    option); other keyword arguments go to torch.compile as they are. With ``share_inputs`` the
    quantized siblings' codes are first stored back to back (:func:`~quantune.qlinear.colocate_siblings`:
    same values and memory, so a merged group runs as one launch)."""
    from torch._inductor import list_mode_options

    from quantune.qlinear import colocate_siblings

    opts = {**(list_mode_options(mode) if mode else {}), **(options or {})}
    if share_inputs:
        colocate_siblings(model)
        opts.setdefault("post_grad_custom_post_pass", SHARE_INPUTS)
    return torch.compile(model, options=opts or None, **kwargs)
