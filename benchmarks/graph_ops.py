"""Graph ops per train step of the gradient-health variants (issue #16).

On TensorFlow's graph executor on CPU a step pays about 2.75 µs per op,
whatever the op does (benchmarks/RESULTS.md, "Cost of the gradient-health
stack, and where it goes: graph ops"): on the 1 ms Keras example the op count
predicts the overhead, and unlike a timing it is deterministic, so it can be
measured on a busy machine.

`python -m benchmarks.graph_ops [--workloads NAME ...] [--variants NAME ...]
[--by-type] [--by-scope [DEPTH]]`

Each variant of `benchmarks.gradient_health` (same workloads, models,
optimizers and callbacks) is fitted for one epoch; then the ops of the
`tf.function` concrete function of `model.train_function` are counted: the
ops of the function and of every function of its library (the train step
itself, `cond` and `while` branches), without `Const`, `Placeholder`, `NoOp`
and `Identity`. `--by-type` adds, per variant, the count of each op type and
its difference to plain fit; `--by-scope` the count per name scope (the
first DEPTH parts of the op's name, branch ops under the `cond` that calls
them), so that each component's ops can be attributed.
"""

import argparse
import collections
import sys

from benchmarks.common import environment
from benchmarks.gradient_health import WORKLOADS
from benchmarks.gradient_health import fitted_variants

IGNORED = frozenset({"Const", "Placeholder", "NoOp", "Identity"})
# Attributes of an op that name the functions it calls.
_FUNCTION_ATTRS = ("f", "then_branch", "else_branch", "cond", "body", "branches")


def train_function_graph(model):
    """The `GraphDef` of the traced `tf.function` behind `model.train_function`.

    Keras 3 (TensorFlow backend) makes `train_function` a plain Python
    closure over `multi_step_on_iterator`, the `tf.function` that `fit`
    calls with its iterator; this returns its (only) concrete function's
    graph, whose library holds the train step and its branches.
    """
    closure = {
        getattr(cell.cell_contents, "__name__", None): cell.cell_contents
        for cell in model.train_function.__closure__ or ()
    }
    concrete = closure["multi_step_on_iterator"]._list_all_concrete_functions()
    if len(concrete) != 1:
        raise RuntimeError(f"expected one traced train function, got {len(concrete)}")
    return concrete[0].graph.as_graph_def()


def graph_ops(graph_def):
    """`(scoped name, op type)` of every counted op of `graph_def`.

    Walks from the top-level graph into the functions each op calls, so an
    op in a `cond` branch is named after the `cond` (`.../cond/branch op`);
    each function of the library is counted once (as the total of the
    issue's analysis), under the first op found calling it. Functions no op
    calls are counted under their own name.
    """
    library = {f.signature.name: f for f in graph_def.library.function}
    seen = set()
    ops = []

    def called(node):
        for key in _FUNCTION_ATTRS:
            if key not in node.attr:
                continue
            value = node.attr[key]
            if value.HasField("func"):
                yield value.func.name
            for func in value.list.func:
                yield func.name

    def walk(nodes, prefix):
        for node in nodes:
            name = f"{prefix}{node.name}"
            if node.op not in IGNORED:
                ops.append((name, node.op))
            for function in called(node):
                if function in library and function not in seen:
                    seen.add(function)
                    walk(library[function].node_def, f"{name}/")

    walk(graph_def.node, "")
    for function, definition in library.items():
        if function not in seen:
            seen.add(function)
            walk(definition.node_def, f"{function}/")
    return ops


def _scope(name, depth):
    # Drop Keras' and TensorFlow's wrapper names so scopes read as the code's.
    parts = [
        part
        for part in name.split("/")
        if not part.startswith(("StatefulPartitionedCall", "PartitionedCall"))
    ]
    return "/".join(parts[: min(depth, len(parts) - 1)]) or "(top)"


def count(workload, only=None):
    """`{variant: [(scoped name, op type), ...]}` for `workload`'s variants."""
    return {
        name: graph_ops(train_function_graph(model))
        for name, model, _ in fitted_variants(workload, only)
    }


def _difference_table(title, key, counts, top):
    base = collections.Counter(key(op) for op in counts["plain fit"])
    lines = []
    for variant, ops in counts.items():
        if variant == "plain fit":
            continue
        these = collections.Counter(key(op) for op in ops)
        diff = {k: these[k] - base[k] for k in set(these) | set(base)}
        diff = {k: v for k, v in diff.items() if v}
        lines.append(
            f"\n{title}, {variant}: {len(ops)} ops, {len(ops) - sum(base.values()):+d} over plain fit\n"
        )
        lines.append(
            f"| {title.split()[-1]} | ops | over plain fit |\n| --- | --- | --- |"
        )
        ranked = sorted(diff.items(), key=lambda item: (-abs(item[1]), item[0]))
        for k, v in ranked[:top]:
            lines.append(f"| `{k}` | {these[k]} | {v:+d} |")
        if len(ranked) > top:
            rest = sum(v for _, v in ranked[top:])
            lines.append(f"| ({len(ranked) - top} more) | | {rest:+d} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        default=["example", "transformer"],
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="only the variants whose name contains one of these "
        "(plain fit is always counted)",
    )
    parser.add_argument("--by-type", action="store_true")
    parser.add_argument("--by-scope", type=int, nargs="?", const=3, default=None)
    parser.add_argument("--top", type=int, default=40, help="rows per breakdown")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print("## Graph ops per train step (issue #16)\n")
    print(f"Machine: {environment()}\n")
    print(
        "Ops of the train function's concrete function and of its library "
        "(train step, `cond`/`while` branches), without Const, Placeholder, "
        "NoOp and Identity, after a one-epoch fit.\n"
    )
    results = {workload: count(workload, args.variants) for workload in args.workloads}
    print("| model | variant | ops | over plain fit |\n| --- | --- | --- | --- |")
    for workload, counts in results.items():
        base = len(counts["plain fit"])
        for variant, ops in counts.items():
            print(f"| {workload} | {variant} | {len(ops)} | {len(ops) - base:+d} |")
    for workload, counts in results.items():
        lines = []
        if args.by_type:
            lines += _difference_table(
                f"{workload}: by op type", lambda op: op[1], counts, args.top
            )
        if args.by_scope is not None:
            lines += _difference_table(
                f"{workload}: by scope",
                lambda op: _scope(op[0], args.by_scope),
                counts,
                args.top,
            )
        if lines:
            print("\n".join(lines))


if __name__ == "__main__":
    main()
